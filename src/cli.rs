//! The command line: argument parsing and dispatch to the library. Errors become
//! `anyhow` here and only here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nspawn::bootstrap::{self, Options};
use nspawn::cache::{Mode as CacheMode, TreeCache};
use nspawn::resolve::Variant;
use nspawn::sandbox::PrivateUsers;

#[derive(Parser)]
#[command(
    name = "packer-plugin-nspawn",
    version,
    about = "Packer builder for systemd-nspawn machines, with a native Debian/Ubuntu bootstrap"
)]
pub struct Cli {
    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bootstrap a Debian/Ubuntu root filesystem into TARGET natively.
    Bootstrap(BootstrapArgs),
    /// Compare our bootstrap with debootstrap and mmdebstrap, cold and warm.
    Bench(BenchArgs),
    /// List or prune the base-tree cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// The cache directory (as given to bootstrap).
        #[arg(long, global = true, default_value = "/var/cache/apt/archives")]
        cache_dir: PathBuf,
    },
    /// Install this binary where Packer finds it (both layouts unless one is chosen).
    Install {
        /// Only `~/.packer.d/plugins/packer-builder-nspawn` (Packer 1.6.6 ... 1.10).
        #[arg(long, conflicts_with = "modern")]
        legacy: bool,
        /// Only the `github.com/.../packer-plugin-nspawn_vX.Y.Z_x5.0_linux_amd64` layout (Packer >= 1.7).
        #[arg(long)]
        modern: bool,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// One line per cached tree: digest, size, last use, suite/variant/arch.
    List,
    /// Remove least recently used trees until at most SIZE remain (0 = all).
    Prune {
        #[arg(long, default_value = "0", value_parser = |s: &str| nspawn::cache::parse_size(s).map_err(|e| e.to_string()))]
        max_size: u64,
    },
}

fn run_cache(action: CacheAction, cache_dir: PathBuf) -> anyhow::Result<()> {
    let c = TreeCache::new(&cache_dir, 0);
    match action {
        CacheAction::List => {
            let entries = c.entries();
            let mut total = 0u64;
            for e in &entries {
                let m = &e.manifest;
                let k = &m.key.inputs;
                let get = |n: &str| k.get(n).map(String::as_str).unwrap_or("?");
                total += m.bytes;
                println!(
                    "{}  {:>8.1} MiB  {:>6} entries  used {}  {} {} {}{}{}",
                    &m.digest[..12],
                    m.bytes as f64 / 1048576.0,
                    m.entries,
                    nspawn::archive::release::format_rfc2822(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.last_used)
                    ),
                    get("suite"),
                    get("variant"),
                    get("arch"),
                    if get("include").is_empty() {
                        String::new()
                    } else {
                        format!(" +{}", get("include"))
                    },
                    if get("private_users") == "no" {
                        String::new()
                    } else {
                        format!(" userns {}", get("private_users"))
                    },
                );
            }
            println!(
                "{} trees, {:.1} MiB in {}",
                entries.len(),
                total as f64 / 1048576.0,
                c.root().display()
            );
        }
        CacheAction::Prune { max_size } => {
            let removed = c.prune_to(max_size, None)?;
            for e in &removed {
                println!(
                    "removed {} ({:.1} MiB)",
                    &e.manifest.digest[..12],
                    e.manifest.bytes as f64 / 1048576.0
                );
            }
            println!("{} trees removed", removed.len());
        }
    }
    Ok(())
}

/// Whether `first` (argv[1]) names one of our own commands rather than a Packer
/// plugin invocation (`describe`, `start`, or none at all for Packer 1.6.6).
pub fn is_cli_command(first: Option<&str>) -> bool {
    matches!(
        first,
        Some(
            "bootstrap"
                | "bench"
                | "cache"
                | "install"
                | "help"
                | "--help"
                | "-h"
                | "--version"
                | "-V"
        )
    )
}

fn run_install(legacy: bool, modern: bool) -> anyhow::Result<()> {
    use nspawn::packer::{self, InstallLayout};
    let layouts = match (legacy, modern) {
        (true, false) => vec![InstallLayout::Legacy],
        (false, true) => vec![InstallLayout::Modern],
        _ => vec![InstallLayout::Legacy, InstallLayout::Modern],
    };
    let exe = std::env::current_exe().context("locating this executable")?;
    for f in packer::install(&exe, &layouts)? {
        let who = if f.ends_with("packer-builder-nspawn") {
            "for Packer 1.6.6 ... 1.10 (builder type \"nspawn\")"
        } else if f.to_string_lossy().ends_with("_SHA256SUM") {
            "checksum of the above"
        } else {
            "for Packer >= 1.7 (required from 1.11)"
        };
        println!("installed {} {who}", f.display());
    }
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    /// Suite (default: the host's).
    #[arg(long)]
    suite: Option<String>,
    /// Mirror (default: the host's).
    #[arg(long)]
    mirror: Option<String>,
    #[arg(long, default_value = "minbase")]
    variant: String,
    /// Warm runs per tool (after one cold run).
    #[arg(long, default_value_t = 3)]
    warm_runs: usize,
    /// Tools to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ours,debootstrap,mmdebstrap"
    )]
    tools: Vec<String>,
    /// Scratch directory for trees and caches.
    #[arg(long, default_value = "/var/tmp/packer-plugin-nspawn-bench")]
    scratch: PathBuf,
    /// Do not mount a tmpfs on the scratch directory.
    #[arg(long)]
    no_tmpfs: bool,
    /// Also write the samples as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BootstrapArgs {
    /// Suite or codename (default: the host's, from its APT sources).
    #[arg(long)]
    suite: Option<String>,
    /// Mirror URL: http://, https:// or file:/// (default: the host's).
    #[arg(long)]
    mirror: Option<String>,
    /// Components, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "main")]
    components: Vec<String>,
    /// minbase, buildd or default (required + important).
    #[arg(long, default_value = "minbase", value_parser = |s: &str| s.parse::<Variant>().map_err(|e| e.to_string()))]
    variant: Variant,
    /// Extra packages, comma-separated.
    #[arg(long, value_delimiter = ',')]
    include: Vec<String>,
    /// Packages to leave out of the seeds, comma-separated.
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// Target architecture (default: the host's).
    #[arg(long)]
    arch: Option<String>,
    /// OpenPGP keyring to verify the archive with (default: the host's archive keyring).
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Where verified .debs and indices are kept between runs.
    #[arg(long, default_value = "/var/cache/apt/archives")]
    cache_dir: PathBuf,
    /// Print the resolved package names, one per line, and exit.
    #[arg(long)]
    print_debs: bool,
    /// Use only the cache dir (or a file:// mirror): no network.
    #[arg(long)]
    offline: bool,
    /// Accept a Release whose Valid-Until has passed.
    #[arg(long)]
    ignore_valid_until: bool,
    /// Parallel downloads and unpack workers.
    #[arg(long)]
    jobs: Option<usize>,
    /// Replace an existing TARGET (only once the new tree is complete).
    #[arg(long)]
    force: bool,
    /// No progress output.
    #[arg(short, long)]
    quiet: bool,
    /// Stop after unpacking (no maintainer scripts), like debootstrap --foreign.
    #[arg(long)]
    foreign: bool,
    /// Base-tree cache: `auto` (use a tree built from the same inputs, else build and
    /// store), `refresh` (build and replace) or `off`.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<CacheMode>().map_err(|e| e.to_string()))]
    cache: CacheMode,
    /// Size limit of the base-tree cache (`500M`, `20G`; 0 = none); least recently used trees go first.
    #[arg(long, default_value = "20G", value_parser = |s: &str| nspawn::cache::parse_size(s).map_err(|e| e.to_string()))]
    cache_limit: u64,
    /// Build the tree for a user namespace: `no`, `pick` or a base uid (multiple of 65536).
    #[arg(long, default_value = "no", value_parser = |s: &str| PrivateUsers::parse(s))]
    private_users: PrivateUsers,
    /// Where the root filesystem goes (built beside it, renamed on success).
    #[arg(required_unless_present = "print_debs")]
    target: Option<PathBuf>,
}

/// Blocks SIGINT/SIGTERM/SIGHUP in every thread (call before any thread starts) and
/// handles them on one thread: remove the staging trees in flight, then exit 130/143.
fn install_interrupt_cleanup() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("interrupted ({sig}): removing the unfinished tree");
            bootstrap::remove_in_flight();
            std::process::exit(128 + sig as i32);
        }
    });
}

fn run_bootstrap(a: BootstrapArgs) -> anyhow::Result<()> {
    let opts = Options {
        suite: a.suite,
        mirror: a.mirror,
        components: a.components,
        variant: a.variant,
        include: a.include.into_iter().filter(|s| !s.is_empty()).collect(),
        exclude: a.exclude.into_iter().filter(|s| !s.is_empty()).collect(),
        arch: a.arch,
        keyring: a.keyring,
        cache_dir: a.cache_dir,
        offline: a.offline,
        ignore_valid_until: a.ignore_valid_until,
        jobs: a.jobs,
        force: a.force,
        quiet: a.quiet,
        foreign: a.foreign,
        private_users: a.private_users,
        cache: a.cache,
        cache_limit: a.cache_limit,
    };
    install_interrupt_cleanup();
    if opts.offline {
        // No uplink for the whole run, not only the second stage: a fresh network
        // namespace (loopback only) before any thread or socket exists.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("--offline: creating a network namespace without uplink (needs root)")?;
    }
    if a.print_debs {
        for p in bootstrap::print_debs(&opts)? {
            println!("{p}");
        }
        return Ok(());
    }
    let target = a.target.context("TARGET is required")?;
    let out = bootstrap::bootstrap(&opts, &target)?;
    for w in &out.warnings {
        eprintln!("W: {w}");
    }
    let t = &out.timings;
    eprintln!(
        "I: {} packages {} into {} in {:.2}s (resolve {:.2}s, download {:.2}s: {} fetched / {} cached, {:.1} MiB; unpack {:.2}s, {:.1} MiB; dpkg database {:.2}s; id shift {:.2}s; configure {:.2}s)",
        out.packages,
        if out.configured { "installed" } else { "unpacked" },
        out.target.display(),
        t.total,
        t.resolve,
        t.download,
        t.downloaded_packages,
        t.cached_packages,
        t.download_bytes as f64 / 1048576.0,
        t.unpack,
        t.unpack_bytes as f64 / 1048576.0,
        t.dpkg_db,
        t.id_shift,
        t.configure
    );
    eprintln!("I: base-tree cache: {} ({:.2}s)", out.cache, t.cache_copy);
    if let Some(b) = out.private_users_base {
        eprintln!("I: the tree is owned by ids {b}..{}; boot it with systemd-nspawn --private-users={b}:65536 --private-users-ownership=off", b as u64 + 65535);
    }
    if !out.configured {
        eprintln!(
            "I: --foreign: maintainer scripts were not run; every package is 'install ok unpacked'"
        );
    }
    Ok(())
}

fn run_bench(a: BenchArgs) -> anyhow::Result<()> {
    use nspawn::bench;
    let host = nspawn::archive::sources::host_defaults();
    let mirror = a
        .mirror
        .or_else(|| host.as_ref().map(|h| h.mirror.clone()))
        .context("no --mirror and none in the host's APT sources")?;
    let suite = a
        .suite
        .or_else(|| host.as_ref().map(|h| h.suite.clone()))
        .context("no --suite and none in the host's APT sources")?;
    let _tmpfs = if a.no_tmpfs {
        None
    } else {
        Some(bench::TmpfsGuard::mount(&a.scratch)?)
    };
    let spec = bench::BenchSpec {
        suite,
        variant: a.variant,
        mirror,
        warm_runs: a.warm_runs,
        scratch: a.scratch.clone(),
        ours: std::env::current_exe().context("locating our own executable")?,
        tools: a.tools.clone(),
    };
    let samples = bench::run(&spec)?;
    println!(
        "{} {} from {} ({} warm runs; ours = to the end of unpack)\n",
        spec.suite, spec.variant, spec.mirror, spec.warm_runs
    );
    println!("{}", bench::table(&samples, &a.tools));
    if let Some(j) = a.json {
        std::fs::write(&j, serde_json::to_vec_pretty(&samples)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NSPAWN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    let r = match cli.command {
        Command::Bootstrap(a) => run_bootstrap(a),
        Command::Bench(a) => run_bench(a),
        Command::Install { legacy, modern } => run_install(legacy, modern),
        Command::Cache { action, cache_dir } => run_cache(action, cache_dir),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
