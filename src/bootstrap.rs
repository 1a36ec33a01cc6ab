//! Orchestration of a native bootstrap: host defaults → verified suite →
//! package set → verified `.deb`s in the cache → unpacked tree + dpkg database,
//! built in a staging directory beside the target and renamed into place only
//! when every step succeeded.
//!
//! After unpack the second stage runs the maintainer scripts inside the new root
//! in our own namespaces ([`crate::sandbox`]); with `--private-users` the tree is
//! first shifted to the chosen id range and the stage runs in a user namespace.
//! `--foreign` stops after unpack, every package `install ok unpacked`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::archive::client::{self, ArchiveError, SuiteRequest};
use crate::archive::packages::PackageIndex;
use crate::archive::sources;
use crate::archive::verify::{Keyring, VerifyError};
use crate::cache::{Key, Lookup, Mode as CacheMode, TreeCache};
use crate::fetch::{self, DebItem, Expected, FetchError, FetchOptions, Fetcher, Progress};
use crate::resolve::{self, Request, ResolveError, Variant};
use crate::sandbox::{self, PrivateUsers, SandboxError, SandboxSpec};
use crate::{dpkg, unpack};

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("no {what} given and none can be read from the host's APT sources (/etc/apt/sources.list, /etc/apt/sources.list.d/): pass {flag}")]
    NoDefault {
        what: &'static str,
        flag: &'static str,
    },
    #[error("option --{option}: {reason}")]
    BadOption {
        option: &'static str,
        reason: String,
    },
    #[error("target {0} already exists (use --force to replace it)")]
    TargetExists(PathBuf),
    #[error("target {path}: {source}")]
    Target {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache directory {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Keyring(#[from] VerifyError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    #[error(transparent)]
    Dpkg(#[from] dpkg::DpkgError),
    #[error(transparent)]
    TreeCache(#[from] crate::cache::CacheError),
    #[error("second stage: {0}")]
    SecondStage(#[from] SandboxError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Everything a bootstrap run needs; `None` means "from the host".
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub suite: Option<String>,
    pub mirror: Option<String>,
    pub components: Vec<String>,
    pub variant: Variant,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub arch: Option<String>,
    pub keyring: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub ignore_valid_until: bool,
    pub jobs: Option<usize>,
    pub force: bool,
    pub quiet: bool,
    /// Stop after unpack + dpkg database (debootstrap's `--foreign`).
    pub foreign: bool,
    /// Build the tree owned by a shifted id range (`--private-users`).
    pub private_users: PrivateUsers,
    /// How the base-tree cache is used.
    pub cache: CacheMode,
    /// Size limit of the base-tree cache in bytes (0 = none).
    pub cache_limit: u64,
}

/// The settled inputs, after defaults were applied.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub mirror: String,
    pub suite: String,
    pub components: Vec<String>,
    pub arch: String,
    pub keyring: Vec<PathBuf>,
}

/// One package of the resolved set.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub package: String,
    pub version: String,
    pub architecture: String,
    pub filename: String,
    pub sha256: String,
    pub size: u64,
    pub required: bool,
}

/// The outcome of the resolve phase.
#[derive(Debug)]
pub struct Plan {
    pub inputs: Resolved,
    pub codename: String,
    pub release_sha256: String,
    pub signer: String,
    pub packages: Vec<Chosen>,
    /// The Packages stanzas of the set (dpkg's `available`).
    pub available: String,
    pub warnings: Vec<String>,
}

/// Wall time of each phase, in seconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub resolve: f64,
    pub download: f64,
    pub download_bytes: u64,
    pub cached_packages: usize,
    pub downloaded_packages: usize,
    pub unpack: f64,
    pub unpack_bytes: u64,
    pub dpkg_db: f64,
    pub id_shift: f64,
    pub configure: f64,
    pub cache_copy: f64,
    pub total: f64,
}

/// The host's dpkg architecture name.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        other => other,
    }
}

impl Options {
    /// Applies host defaults; errors name the option that has no default.
    pub fn settle(&self) -> Result<Resolved, BootstrapError> {
        let host = sources::host_defaults();
        let mirror = match (&self.mirror, &host) {
            (Some(m), _) => m.trim_end_matches('/').to_string(),
            (None, Some(h)) => h.mirror.clone(),
            (None, None) => {
                return Err(BootstrapError::NoDefault {
                    what: "mirror",
                    flag: "--mirror URL",
                })
            }
        };
        if !(mirror.starts_with("http://")
            || mirror.starts_with("https://")
            || mirror.starts_with("file:///"))
        {
            return Err(BootstrapError::BadOption {
                option: "mirror",
                reason: format!("{mirror:?} is not an http://, https:// or file:/// URL"),
            });
        }
        let suite = match (&self.suite, &host) {
            (Some(s), _) => s.clone(),
            (None, Some(h)) => h.suite.clone(),
            (None, None) => {
                return Err(BootstrapError::NoDefault {
                    what: "suite",
                    flag: "--suite NAME",
                })
            }
        };
        if suite.is_empty() || suite.contains(['/', ' ']) {
            return Err(BootstrapError::BadOption {
                option: "suite",
                reason: format!("{suite:?} is not a suite name"),
            });
        }
        let components = if self.components.is_empty() {
            vec!["main".to_string()]
        } else {
            self.components.clone()
        };
        let keyring = match (&self.keyring, &host) {
            (Some(k), _) => vec![k.clone()],
            (None, Some(h)) if h.keyring.is_some() => vec![h.keyring.clone().unwrap()],
            _ => {
                return Err(BootstrapError::NoDefault {
                    what: "keyring",
                    flag: "--keyring FILE",
                })
            }
        };
        Ok(Resolved {
            mirror,
            suite,
            components,
            arch: self.arch.clone().unwrap_or_else(|| host_arch().to_string()),
            keyring,
        })
    }

    fn lists_dir(&self) -> PathBuf {
        self.cache_dir.join("lists")
    }

    fn suite_request(&self, r: &Resolved) -> SuiteRequest {
        SuiteRequest {
            mirror: r.mirror.clone(),
            suite: r.suite.clone(),
            components: r.components.clone(),
            arch: r.arch.clone(),
            ignore_valid_until: self.ignore_valid_until,
            offline: self.offline,
            now: SystemTime::now(),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, BootstrapError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(BootstrapError::Runtime)
}

async fn make_fetcher(opts: &Options, r: &Resolved) -> Result<Arc<Fetcher>, BootstrapError> {
    let mut fo = FetchOptions::default();
    if let Some(j) = opts.jobs {
        fo.jobs = j.max(1);
    }
    let bases: Vec<&str> = if opts.offline {
        vec![]
    } else {
        vec![r.mirror.as_str()]
    };
    Ok(Arc::new(Fetcher::new(&bases, fo).await?))
}

/// Verifies the suite and resolves the package set.
/// `inputs` are `opts` settled against the host ([`Options::settle`]).
pub async fn plan(
    opts: &Options,
    inputs: Resolved,
    fetcher: &Fetcher,
) -> Result<Plan, BootstrapError> {
    let mut keyring = Keyring::default();
    for k in &inputs.keyring {
        keyring.add_file(k)?;
    }
    let lists = opts.lists_dir();
    let req = opts.suite_request(&inputs);
    let suite = client::fetch_suite(fetcher, &keyring, &req, &lists).await?;
    let index = client::fetch_packages(fetcher, &suite, &req, &lists).await?;
    let codename = suite.codename(&inputs.suite).to_string();
    let resolution = resolve::resolve(
        &index,
        &Request {
            variant: opts.variant,
            include: opts.include.clone(),
            exclude: opts.exclude.clone(),
            codename: codename.clone(),
            https_mirror: inputs.mirror.starts_with("https://"),
            arch: inputs.arch.clone(),
        },
    )?;
    let required: std::collections::HashSet<u32> = resolution.required.iter().copied().collect();
    let packages = chosen(&index, resolution.all(), &required);
    let mut available = String::new();
    for id in resolution.all() {
        available.push_str(index.get(id).raw());
        available.push_str("\n\n");
    }
    Ok(Plan {
        inputs,
        codename,
        release_sha256: suite.release_sha256,
        signer: suite.signer,
        packages,
        available,
        warnings: resolution
            .unsatisfied
            .iter()
            .map(|u| format!("unsatisfied dependency {u}"))
            .collect(),
    })
}

fn chosen(
    index: &PackageIndex,
    ids: impl Iterator<Item = u32>,
    required: &std::collections::HashSet<u32>,
) -> Vec<Chosen> {
    let mut v: Vec<Chosen> = ids
        .map(|id| {
            let p = index.get(id);
            Chosen {
                package: p.name().to_string(),
                version: p.version().to_string(),
                architecture: p.architecture().to_string(),
                filename: p.filename().to_string(),
                sha256: p.sha256().to_ascii_lowercase(),
                size: p.size(),
                required: required.contains(&id),
            }
        })
        .collect();
    v.sort_by(|a, b| a.package.cmp(&b.package));
    v
}

/// The resolved package names, sorted (`--print-debs`).
pub fn print_debs(opts: &Options) -> Result<Vec<String>, BootstrapError> {
    let rt = runtime()?;
    rt.block_on(async {
        let settled = opts.settle()?;
        let fetcher = make_fetcher(opts, &settled).await?;
        let plan = plan(opts, settled.clone(), &fetcher).await?;
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        Ok(plan.packages.into_iter().map(|c| c.package).collect())
    })
}

/// The cache items for a plan.
pub fn deb_items(plan: &Plan, cache_dir: &Path) -> Vec<DebItem> {
    plan.packages
        .iter()
        .map(|c| DebItem {
            package: c.package.clone(),
            url: fetch::join(&plan.inputs.mirror, &c.filename),
            expected: Expected {
                sha256: c.sha256.clone(),
                size: c.size,
            },
            dest: cache_dir.join(fetch::deb_cache_name(
                &c.package,
                &c.version,
                &c.architecture,
            )),
        })
        .collect()
}

/// A staging directory next to `target` that is removed unless committed.
pub struct Staging {
    path: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates `<parent>/.<name>.staging-<pid>`; refuses an existing target
    /// unless `force`.
    pub fn new(target: &Path, force: bool) -> Result<Staging, BootstrapError> {
        let target = if target.is_absolute() {
            target.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|source| BootstrapError::Target {
                    path: target.into(),
                    source,
                })?
                .join(target)
        };
        if target.symlink_metadata().is_ok() && !force {
            return Err(BootstrapError::TargetExists(target));
        }
        let name = target
            .file_name()
            .ok_or_else(|| BootstrapError::BadOption {
                option: "target",
                reason: format!("{} has no final path component", target.display()),
            })?
            .to_string_lossy()
            .into_owned();
        let parent = target.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|source| BootstrapError::Target {
            path: parent.into(),
            source,
        })?;
        remove_stale(parent, &name, &["staging", "old"]);
        let path = parent.join(format!(".{name}.staging-{}", std::process::id()));
        if path.exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir(&path).map_err(|source| BootstrapError::Target {
            path: path.clone(),
            source,
        })?;
        // Root of the new system: 0755 whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Ok(Staging {
            path,
            target,
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the finished tree to the target (replacing an old one only now).
    pub fn commit(mut self) -> Result<PathBuf, BootstrapError> {
        replace_tree(&self.path, &self.target).map_err(|source| BootstrapError::Target {
            path: self.target.clone(),
            source,
        })?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

/// Renames the finished tree `staging` to `target`; an existing target is moved
/// aside first and removed only once the new tree is in place.
pub fn replace_tree(staging: &Path, target: &Path) -> std::io::Result<()> {
    if target.symlink_metadata().is_ok() {
        let old = target.with_file_name(format!(
            ".{}.old-{}",
            target.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(target, &old)?;
        std::fs::rename(staging, target)?;
        let _ = remove_tree(&old);
    } else {
        std::fs::rename(staging, target)?;
    }
    Ok(())
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_tree(&self.path);
        }
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &self.path);
    }
}

/// Staging trees of this process not yet committed or removed (for signal handlers).
static IN_FLIGHT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes every staging tree this process is building: called on Ctrl-C/SIGTERM
/// before exiting, so an interrupted run leaves nothing behind.
pub fn remove_in_flight() {
    let paths = std::mem::take(&mut *IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()));
    for p in paths {
        let _ = remove_tree(&p);
    }
}

/// Removes `.NAME.KIND-PID` leftovers (KIND e.g. `staging`, `old`, `build`) of runs
/// that were killed (PID no longer alive), e.g. by SIGKILL, which no handler can catch.
pub fn remove_stale(parent: &Path, name: &str, kinds: &[&str]) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = kinds
            .iter()
            .find_map(|k| f.strip_prefix(&format!(".{name}.{k}-")))
        else {
            continue;
        };
        let Ok(pid) = rest.parse::<i32>() else {
            continue;
        };
        let alive = pid as u32 == std::process::id()
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            tracing::info!("removing {} left by an interrupted run", e.path().display());
            let _ = remove_tree(&e.path());
        }
    }
}

/// Removes a tree without following symlinks out of it.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What a finished bootstrap reports.
#[derive(Debug)]
pub struct Outcome {
    pub target: PathBuf,
    pub packages: usize,
    pub timings: Timings,
    pub warnings: Vec<String>,
    /// The user-namespace base the tree is owned by, if shifted.
    pub private_users_base: Option<u32>,
    /// Whether maintainer scripts ran (false with `foreign`).
    pub configured: bool,
    /// What the base-tree cache did: `hit …`, `miss: … stored …`, `off`.
    pub cache: String,
}

/// Runs the bootstrap into `target`.
pub fn bootstrap(opts: &Options, target: &Path) -> Result<Outcome, BootstrapError> {
    let started = Instant::now();
    let mut t = Timings::default();
    let rt = runtime()?;
    // Fail before any network traffic when the target is taken.
    if target.symlink_metadata().is_ok() && !opts.force {
        return Err(BootstrapError::TargetExists(target.to_path_buf()));
    }
    let cache = opts.cache_dir.clone();
    std::fs::create_dir_all(&cache).map_err(|source| BootstrapError::Cache {
        path: cache.clone(),
        source,
    })?;
    let settled = opts.settle()?;
    let (fetcher, plan) = rt.block_on(async {
        let fetcher = make_fetcher(opts, &settled).await?;
        let t0 = Instant::now();
        let plan = plan(opts, settled.clone(), &fetcher).await?;
        t.resolve = t0.elapsed().as_secs_f64();
        Ok::<_, BootstrapError>((fetcher, plan))
    })?;

    // The base-tree cache: a tree built from exactly these inputs is copied, not rebuilt.
    let userns = opts.private_users.resolve(&staging_target_hint(target));
    if let Some(map) = &userns {
        map.validate().map_err(|reason| BootstrapError::BadOption {
            option: "private-users",
            reason,
        })?;
    }
    let tree_cache = TreeCache::new(&cache, opts.cache_limit);
    let key = cache_key(opts, &plan, userns.map(|m| m.host_base));
    let mut cache_note = None;
    if opts.cache == CacheMode::Auto {
        let staging = Staging::new(target, opts.force)?;
        let _ = std::fs::remove_dir(staging.path());
        let t1 = Instant::now();
        match tree_cache.restore(&key, staging.path())? {
            Lookup::Hit(entry) => {
                t.cache_copy = t1.elapsed().as_secs_f64();
                personalize(staging.path(), target)?;
                let target = staging.commit()?;
                t.total = started.elapsed().as_secs_f64();
                return Ok(Outcome {
                    target,
                    packages: plan.packages.len(),
                    timings: t,
                    warnings: plan.warnings,
                    private_users_base: userns.map(|m| m.host_base),
                    configured: !opts.foreign,
                    cache: format!("hit {}", &entry.manifest.digest[..12]),
                });
            }
            Lookup::Miss(reason) => cache_note = Some(format!("miss: {reason}")),
        }
    }

    let items = deb_items(&plan, &cache);
    rt.block_on(async {
        let total: u64 = items.iter().map(|i| i.expected.size).sum();
        let progress = Progress::new(items.len() as u64, total);
        let reporter = progress.report("download", opts.quiet);
        let t1 = Instant::now();
        let report = fetcher.fetch_debs(&items, opts.offline, &progress).await;
        reporter.finish();
        let report = report?;
        t.download = t1.elapsed().as_secs_f64();
        t.download_bytes = report.downloaded_bytes;
        t.cached_packages = report.cached;
        t.downloaded_packages = report.downloaded;
        Ok::<_, BootstrapError>(())
    })?;
    drop(rt);

    // Everything is verified and local now: only from here on is anything written
    // next to the target.
    let staging = Staging::new(target, opts.force)?;
    let t2 = Instant::now();
    let inputs: Vec<unpack::DebInput> = items
        .iter()
        .map(|i| unpack::DebInput {
            package: i.package.clone(),
            path: i.dest.clone(),
        })
        .collect();
    let uopts = unpack::UnpackOptions {
        merged_usr: if merged_usr(&plan.codename, opts.variant) {
            unpack::MergedUsr::Yes
        } else {
            unpack::MergedUsr::No
        },
        jobs: opts
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
    };
    let progress = Progress::new(inputs.len() as u64, 0);
    let reporter = progress.report("unpack", opts.quiet);
    let unpacked = unpack::unpack_all(staging.path(), &inputs, &uopts, &|u| {
        progress.add_bytes(u.data_bytes);
        progress.add_item();
    });
    reporter.finish();
    let unpacked = unpacked?;
    t.unpack = t2.elapsed().as_secs_f64();
    t.unpack_bytes = unpacked.iter().map(|u| u.data_bytes).sum();
    // debootstrap extracts the required set with tar before dpkg runs, so those
    // conffiles exist for every maintainer script (see `unpack::place_conffiles`).
    let required: std::collections::HashSet<&str> = plan
        .packages
        .iter()
        .filter(|c| c.required)
        .map(|c| c.package.as_str())
        .collect();
    let is_required = |u: &unpack::UnpackedPackage| required.contains(u.package.as_str());
    let required_unpacked: Vec<&unpack::UnpackedPackage> =
        unpacked.iter().filter(|u| is_required(u)).collect();
    unpack::place_conffiles(staging.path(), &required_unpacked)?;

    if uopts.merged_usr == unpack::MergedUsr::No && !is_before_bookworm(&plan.codename) {
        // debootstrap's marker for a deliberately unmerged tree of bookworm or later.
        let etc = staging.path().join("etc");
        let flag = etc.join("unsupported-skip-usrmerge-conversion");
        std::fs::create_dir_all(&etc)
            .and_then(|_| {
                std::fs::write(&flag, "this system will not be supported in the future\n")
            })
            .map_err(|source| BootstrapError::Target { path: flag, source })?;
    }

    write_system_files(staging.path(), &plan, target)?;

    let t3 = Instant::now();
    dpkg::write_database(
        staging.path(),
        &plan.inputs.arch,
        &unpacked,
        &plan.available,
        &is_required,
    )?;
    t.dpkg_db = t3.elapsed().as_secs_f64();

    if let Some(map) = &userns {
        let t4 = Instant::now();
        sandbox::shift_tree(staging.path(), map)?;
        t.id_shift = t4.elapsed().as_secs_f64();
    }
    if !opts.foreign {
        let t5 = Instant::now();
        let log_path = staging.path().join("var/log/bootstrap.log");
        let mut log =
            std::fs::File::create(&log_path).map_err(|source| BootstrapError::Target {
                path: log_path.clone(),
                source,
            })?;
        let mut spec = SandboxSpec::new(staging.path());
        spec.userns = userns;
        spec.hostname = Some(hostname_for(target));
        // debootstrap's order: the required set first, then what the others pre-depend on.
        let required: Vec<String> = plan
            .packages
            .iter()
            .filter(|c| c.required)
            .map(|c| c.package.clone())
            .collect();
        sandbox::second_stage_phased(staging.path(), &spec, &mut log, &required)?;
        drop(log);
        if let Some(map) = &userns {
            // The log was written from outside the namespace: give it to the tree's root.
            let _ = nix::unistd::chown(
                &log_path,
                Some(nix::unistd::Uid::from_raw(map.host_base)),
                Some(nix::unistd::Gid::from_raw(map.host_base)),
            );
        }
        t.configure = t5.elapsed().as_secs_f64();
    }

    let cache_result = if opts.cache == CacheMode::Off {
        "off".to_string()
    } else {
        let t6 = Instant::now();
        let stored = tree_cache.store(&key, staging.path(), opts.cache == CacheMode::Refresh);
        t.cache_copy = t6.elapsed().as_secs_f64();
        match stored {
            Ok(e) => format!(
                "{}stored {}",
                cache_note.map(|n| format!("{n}; ")).unwrap_or_default(),
                &e.manifest.digest[..12]
            ),
            // A full disk or similar must not fail a finished build.
            Err(e) => {
                tracing::warn!("{e}");
                format!("not stored: {e}")
            }
        }
    };

    let target = staging.commit()?;
    t.total = started.elapsed().as_secs_f64();
    Ok(Outcome {
        target,
        packages: plan.packages.len(),
        timings: t,
        warnings: plan.warnings,
        private_users_base: userns.map(|m| m.host_base),
        configured: !opts.foreign,
        cache: cache_result,
    })
}

/// Everything that decides a bootstrapped tree's content.
pub fn cache_key(opts: &Options, plan: &Plan, private_users: Option<u32>) -> Key {
    let mut k = Key::default();
    let i = &plan.inputs;
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v.join(",")
    };
    for (name, value) in [
        ("release", plan.release_sha256.clone()),
        ("mirror", i.mirror.clone()),
        ("suite", i.suite.clone()),
        ("components", i.components.join(",")),
        ("arch", i.arch.clone()),
        ("variant", opts.variant.to_string()),
        ("include", sorted(&opts.include)),
        ("exclude", sorted(&opts.exclude)),
        ("foreign", opts.foreign.to_string()),
        (
            "private_users",
            private_users.map_or("no".into(), |b| b.to_string()),
        ),
        ("builder", env!("CARGO_PKG_VERSION").to_string()),
    ] {
        k.inputs.insert(name.into(), value);
    }
    k.packages = plan
        .packages
        .iter()
        .map(|c| format!("{} {} {}", c.package, c.version, c.sha256))
        .collect();
    k.packages.sort();
    k
}

/// Gives a tree copied from the cache this machine's identity: `/etc/hostname` and
/// the machine's line in `/etc/hosts` (files are rewritten in place, keeping owner
/// and mode, which matters in shifted trees).
fn personalize(root: &Path, target: &Path) -> Result<(), BootstrapError> {
    let name = hostname_for(target);
    let rewrite = |rel: &str, f: &dyn Fn(&str) -> String| -> Result<(), BootstrapError> {
        let path = root.join(rel);
        let err = |source| BootstrapError::Target {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() => {
                let old = std::fs::read_to_string(&path).map_err(err)?;
                let new = f(&old);
                if new != old {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .map_err(err)?;
                    file.write_all(new.as_bytes()).map_err(err)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    };
    rewrite("etc/hostname", &|_| format!("{name}\n"))?;
    rewrite("etc/hosts", &|old| {
        old.lines()
            .map(|l| {
                if l.starts_with("127.0.1.1") {
                    format!("127.0.1.1\t{name}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    })?;
    Ok(())
}

/// The files debootstrap writes itself, adapted for machine images:
///
/// * `/etc/apt/sources.list.d/<vendor>.sources` (deb822) naming the mirror that
///   was actually used and the keyring that verified it (`Signed-By`; copied to
///   `/etc/apt/keyrings/` when the tree does not ship that file itself);
/// * `/etc/fstab` placeholder, `/etc/hostname` (the machine's name, not the
///   host's: an image must not carry the build host's identity) and `/etc/hosts`;
/// * no `/etc/resolv.conf`: systemd-nspawn provides one when the machine runs,
///   and the build host's resolver configuration does not belong in an image.
pub fn write_system_files(root: &Path, plan: &Plan, target: &Path) -> Result<(), BootstrapError> {
    let w = |rel: &str, data: &[u8], only_if_absent: bool| -> Result<(), BootstrapError> {
        let path = root.join(rel);
        if only_if_absent && path.symlink_metadata().is_ok() {
            return Ok(());
        }
        let err = |source| BootstrapError::Target {
            path: path.clone(),
            source,
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(err)?;
        }
        std::fs::write(&path, data).map_err(err)
    };
    let inputs = &plan.inputs;
    let mut signed_by = Vec::new();
    for k in &inputs.keyring {
        let inside = root.join(k.strip_prefix("/").unwrap_or(k));
        let same = std::fs::read(&inside).ok() == std::fs::read(k).ok() && inside.is_file();
        if same {
            signed_by.push(k.display().to_string());
        } else {
            let name = k
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "archive.gpg".into());
            let rel = format!("etc/apt/keyrings/{name}");
            let data = std::fs::read(k).map_err(|source| BootstrapError::Target {
                path: k.clone(),
                source,
            })?;
            w(&rel, &data, false)?;
            signed_by.push(format!("/{rel}"));
        }
    }
    let vendor = if inputs
        .keyring
        .iter()
        .any(|k| k.to_string_lossy().contains("ubuntu"))
    {
        "ubuntu"
    } else if inputs
        .keyring
        .iter()
        .any(|k| k.to_string_lossy().contains("debian"))
    {
        "debian"
    } else {
        "archive"
    };
    let sources = format!(
        "# Written by packer-plugin-nspawn bootstrap: the archive this tree was built from.\n\
         Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\nSigned-By: {}\n",
        inputs.mirror,
        inputs.suite,
        inputs.components.join(" "),
        signed_by.join(" ")
    );
    w(
        &format!("etc/apt/sources.list.d/{vendor}.sources"),
        sources.as_bytes(),
        false,
    )?;
    w("etc/fstab", b"# UNCONFIGURED FSTAB FOR BASE SYSTEM\n", true)?;
    let name = hostname_for(target);
    w("etc/hostname", format!("{name}\n").as_bytes(), true)?;
    w(
        "etc/hosts",
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
        )
        .as_bytes(),
        true,
    )?;
    Ok(())
}

/// A valid hostname from a target directory's name (`my_machine.v2` → `my-machine-v2`).
pub fn hostname_for(target: &Path) -> String {
    let raw = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').to_string();
    s.truncate(63);
    if s.is_empty() {
        "localhost".into()
    } else {
        s
    }
}

fn is_before_bookworm(codename: &str) -> bool {
    [
        "etch", "lenny", "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye",
    ]
    .iter()
    .any(|s| codename.starts_with(s))
}

/// The path `pick` hashes: the final target, so a rebuild picks the same base.
fn staging_target_hint(target: &Path) -> PathBuf {
    std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf())
}

/// Whether debootstrap makes the suite's tree merged-/usr: every suite after
/// stretch, except the buildd variant up to bookworm.
pub fn merged_usr(codename: &str, variant: Variant) -> bool {
    const SPLIT: &[&str] = &["etch", "lenny", "squeeze", "wheezy", "jessie", "stretch"];
    const BUILDD_SPLIT: &[&str] = &["buster", "bullseye", "bookworm"];
    let starts = |l: &[&str]| l.iter().any(|s| codename.starts_with(s));
    !(starts(SPLIT) || (variant == Variant::Buildd && starts(BUILDD_SPLIT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_staging_of_dead_runs_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid 2^22+1 is above pid_max's default and never alive.
        let stale = dir.path().join(".m.staging-4194305");
        std::fs::create_dir_all(stale.join("etc")).unwrap();
        let other = dir.path().join(".other.staging-4194305");
        std::fs::create_dir(&other).unwrap();
        let s = Staging::new(&dir.path().join("m"), false).unwrap();
        assert!(!stale.exists(), "a dead run's staging tree is gone");
        assert!(
            other.exists(),
            "another machine's staging tree is not ours to touch"
        );
        drop(s);
        remove_in_flight();
    }

    #[test]
    fn hostnames() {
        assert_eq!(
            hostname_for(Path::new("/var/lib/machines/My_Machine.v2")),
            "my-machine-v2"
        );
        assert_eq!(hostname_for(Path::new("/")), "localhost");
    }

    #[test]
    fn merged_usr_follows_debootstrap() {
        assert!(merged_usr("bookworm", Variant::Minbase));
        assert!(merged_usr("trixie", Variant::Buildd));
        assert!(!merged_usr("bookworm", Variant::Buildd));
        assert!(!merged_usr("stretch", Variant::Default));
    }

    #[test]
    fn staging_never_touches_an_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        assert!(matches!(
            Staging::new(&target, false),
            Err(BootstrapError::TargetExists(_))
        ));
        {
            let s = Staging::new(&target, true).unwrap();
            std::fs::write(s.path().join("new"), b"y").unwrap();
            // Dropped without commit: the staging tree goes, the target stays.
        }
        assert!(target.join("keep").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let s = Staging::new(&target, true).unwrap();
        std::fs::write(s.path().join("new"), b"y").unwrap();
        s.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("keep").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
