//! `bench`: our bootstrap next to debootstrap and mmdebstrap for the same suite,
//! variant and mirror, cold and warm, in one run on one machine; reports wall
//! time, user+sys CPU, peak RSS and the ratios.
//!
//! Method (as in the project's bootstrap benchmark notes): every tool writes its
//! trees into one scratch tmpfs (so deleting them costs nothing and no tool pays
//! for the disk's slow mass deletes); page cache is dropped before each run when
//! permitted; "cold" starts with an empty package cache, "warm" reuses it
//! (mmdebstrap is warmed with the sync-in setup hook its manual documents).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench scratch directory {path}: {source}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
}

/// One measured run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    pub tool: String,
    pub mode: String,
    pub wall: f64,
    pub cpu: f64,
    pub max_rss_mib: f64,
    /// Cores' worth of CPU that other processes used during the run (contention).
    pub other_cpu: f64,
    pub ok: bool,
}

/// Busy and total jiffies of the whole machine (`/proc/stat` first line).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub suite: String,
    pub variant: String,
    pub mirror: String,
    pub warm_runs: usize,
    pub scratch: PathBuf,
    /// Our own executable.
    pub ours: PathBuf,
    pub tools: Vec<String>,
}

/// Waits for `pid`, returning (exited successfully, user+sys seconds, max RSS KiB).
fn wait_rusage(pid: u32) -> (bool, f64, i64) {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own un-reaped child; `status` and `ru` are valid for writes.
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
    if r < 0 {
        return (false, 0.0, 0);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (ok, tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss)
}

fn drop_caches() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn measure(tool: &str, mode: &str, mut cmd: Command, log: &Path) -> Result<Sample, BenchError> {
    drop_caches();
    let logf = std::fs::File::create(log).map_err(|source| BenchError::Scratch {
        path: log.into(),
        source,
    })?;
    cmd.stdout(logf.try_clone().map_err(|source| BenchError::Scratch {
        path: log.into(),
        source,
    })?)
    .stderr(logf)
    .stdin(std::process::Stdio::null());
    let busy0 = cpu_jiffies();
    let t = Instant::now();
    let child = cmd.spawn().map_err(|source| BenchError::Spawn {
        tool: tool.into(),
        source,
    })?;
    let (ok, cpu, rss) = wait_rusage(child.id());
    let wall = t.elapsed().as_secs_f64();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let other_cpu = match (busy0, cpu_jiffies()) {
        (Some((b0, _)), Some((b1, _))) => (((b1 - b0) as f64 / hz - cpu) / wall).max(0.0),
        _ => 0.0,
    };
    // The Child was reaped by wait4; forget it so its Drop does nothing.
    std::mem::forget(child);
    let s = Sample {
        tool: tool.into(),
        mode: mode.into(),
        wall,
        cpu,
        max_rss_mib: rss as f64 / 1024.0,
        other_cpu,
        ok,
    };
    eprintln!(
        "bench: {tool:<13} {mode:<5} {:>7.2}s wall {:>7.2}s cpu {:>6.0} MiB  other load {:.2}{}",
        s.wall,
        s.cpu,
        s.max_rss_mib,
        s.other_cpu,
        if ok {
            String::new()
        } else {
            format!("  FAILED (log: {})", log.display())
        }
    );
    Ok(s)
}

fn command(spec: &BenchSpec, tool: &str, cache: &Path, root: &Path, warm: bool) -> Option<Command> {
    let v = spec.variant.as_str();
    match tool {
        "ours" | "ours-foreign" | "ours-cached" => {
            let mut c = Command::new(&spec.ours);
            c.args([
                "bootstrap",
                "--quiet",
                "--suite",
                &spec.suite,
                "--variant",
                v,
            ]);
            match tool {
                "ours-foreign" => c.args(["--foreign", "--cache", "off"]),
                // Cold builds and stores the tree; warm runs copy it from the base-tree cache.
                "ours-cached" => c.args(["--cache", "auto"]),
                _ => c.args(["--cache", "off"]),
            };
            c.arg("--mirror")
                .arg(&spec.mirror)
                .arg("--cache-dir")
                .arg(cache)
                .arg(root);
            Some(c)
        }
        "debootstrap" => {
            let mut c = Command::new("debootstrap");
            if v != "default" {
                c.arg(format!("--variant={v}"));
            }
            c.arg(format!("--cache-dir={}", cache.display()))
                .arg(&spec.suite)
                .arg(root)
                .arg(&spec.mirror);
            Some(c)
        }
        "mmdebstrap" => {
            let mv = if v == "default" { "debootstrap" } else { v };
            let mut c = Command::new("mmdebstrap");
            c.args(["--quiet", "--mode=root", &format!("--variant={mv}")]);
            if warm {
                c.arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
                    .arg(format!(
                        "--setup-hook=sync-in {} /var/cache/apt/archives/",
                        cache.display()
                    ));
            } else {
                c.arg("--skip=essential/unlink,cleanup/apt/cache");
            }
            c.arg(&spec.suite).arg(root).arg(&spec.mirror);
            Some(c)
        }
        _ => None,
    }
}

fn have(tool: &str) -> bool {
    tool.starts_with("ours")
        || std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p).any(|d| d.join(tool).is_file())
                || Path::new("/usr/sbin").join(tool).is_file()
        })
}

/// Runs the comparison; returns every sample.
pub fn run(spec: &BenchSpec) -> Result<Vec<Sample>, BenchError> {
    let scratch_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::Scratch { path, source }
    };
    std::fs::create_dir_all(&spec.scratch).map_err(scratch_err(&spec.scratch))?;
    let mut samples = Vec::new();
    for tool in &spec.tools {
        if !have(tool) {
            eprintln!("bench: {tool} is not installed, skipped");
            continue;
        }
        let dir = spec.scratch.join(tool);
        let cache = dir.join("cache");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&cache).map_err(scratch_err(&cache))?;
        for i in 0..=spec.warm_runs {
            let warm = i > 0;
            let root = dir.join(format!("root{i}"));
            let Some(cmd) = command(spec, tool, &cache, &root, warm) else {
                eprintln!(
                    "bench: unknown tool {tool:?} (expected ours, ours-foreign, ours-cached, debootstrap or mmdebstrap)"
                );
                break;
            };
            let mode = if warm { "warm" } else { "cold" };
            let s = measure(tool, mode, cmd, &dir.join(format!("run{i}.log")))?;
            if tool == "mmdebstrap" && !warm {
                // Seed the warm runs' cache with the .debs the cold run kept.
                if let Ok(rd) = std::fs::read_dir(root.join("var/cache/apt/archives")) {
                    for e in rd.flatten() {
                        if e.path().extension().is_some_and(|x| x == "deb") {
                            let _ = std::fs::copy(e.path(), cache.join(e.file_name()));
                        }
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&root);
            samples.push(s);
        }
    }
    Ok(samples)
}

fn best(samples: &[Sample], tool: &str, mode: &str) -> Option<Sample> {
    samples
        .iter()
        .filter(|s| s.tool == tool && s.mode == mode && s.ok)
        .min_by(|a, b| a.wall.total_cmp(&b.wall))
        .cloned()
}

fn median(samples: &[Sample], tool: &str, mode: &str) -> Option<f64> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.tool == tool && s.mode == mode && s.ok)
        .map(|s| s.wall)
        .collect();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

/// A Markdown table: best and median wall, CPU, peak RSS and ours/theirs ratios.
pub fn table(samples: &[Sample], tools: &[String]) -> String {
    let mut out = String::from(
        "| tool | mode | wall best s | wall median s | user+sys s | peak RSS MiB | other load (cores) | ours / this (wall) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for mode in ["cold", "warm"] {
        let ours = best(samples, "ours", mode);
        for tool in tools {
            let Some(b) = best(samples, tool, mode) else {
                continue;
            };
            let ratio = ours
                .as_ref()
                .map(|o| format!("{:.2}×", o.wall / b.wall))
                .unwrap_or_else(|| "–".into());
            out.push_str(&format!(
                "| {tool} | {mode} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {ratio} |\n",
                b.wall,
                median(samples, tool, mode).unwrap_or(b.wall),
                b.cpu,
                b.max_rss_mib,
                b.other_cpu
            ));
        }
    }
    out
}

/// A tmpfs mounted on a directory for the lifetime of the guard.
pub struct TmpfsGuard {
    path: PathBuf,
}

impl TmpfsGuard {
    pub fn mount(path: &Path) -> Result<TmpfsGuard, BenchError> {
        std::fs::create_dir_all(path).map_err(|source| BenchError::Scratch {
            path: path.into(),
            source,
        })?;
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("mode=0755"),
        )
        .map_err(|e| BenchError::Scratch {
            path: path.into(),
            source: std::io::Error::from(e),
        })?;
        Ok(TmpfsGuard { path: path.into() })
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(tool: &str, mode: &str, wall: f64, ok: bool) -> Sample {
        Sample {
            tool: tool.into(),
            mode: mode.into(),
            wall,
            cpu: wall / 2.0,
            max_rss_mib: 30.0,
            other_cpu: 0.1,
            ok,
        }
    }

    #[test]
    fn table_uses_best_successful_runs_and_ratios() {
        let samples = vec![
            s("ours", "warm", 3.0, true),
            s("ours", "warm", 2.0, true),
            s("mmdebstrap", "warm", 8.0, true),
            s("mmdebstrap", "warm", 1.0, false), // failed runs never count
            s("debootstrap", "cold", 20.0, true),
        ];
        let t = table(
            &samples,
            &["ours".into(), "mmdebstrap".into(), "debootstrap".into()],
        );
        assert!(t.contains("| ours | warm | 2.00 | 3.00 |"), "{t}");
        assert!(
            t.contains("| mmdebstrap | warm | 8.00 | 8.00 | 4.00 | 30 | 0.10 | 0.25× |"),
            "{t}"
        );
        // No cold run of ours: no ratio.
        assert!(
            t.contains("| debootstrap | cold | 20.00 | 20.00 | 10.00 | 30 | 0.10 | – |"),
            "{t}"
        );
    }

    #[test]
    fn commands_per_tool() {
        let spec = BenchSpec {
            suite: "bookworm".into(),
            variant: "default".into(),
            mirror: "http://mirror.example/debian".into(),
            warm_runs: 1,
            scratch: "/tmp/x".into(),
            ours: "/bin/ours".into(),
            tools: vec![],
        };
        let dbg = |c: Command| format!("{c:?}");
        let mm = dbg(command(&spec, "mmdebstrap", Path::new("/c"), Path::new("/r"), true).unwrap());
        assert!(
            mm.contains("--variant=debootstrap") && mm.contains("sync-in /c"),
            "{mm}"
        );
        let db = dbg(command(
            &spec,
            "debootstrap",
            Path::new("/c"),
            Path::new("/r"),
            false,
        )
        .unwrap());
        assert!(
            !db.contains("--variant") && db.contains("--cache-dir=/c"),
            "{db}"
        );
        let of = dbg(command(
            &spec,
            "ours-foreign",
            Path::new("/c"),
            Path::new("/r"),
            false,
        )
        .unwrap());
        assert!(of.contains("--foreign") && of.contains("\"off\""), "{of}");
        let oc =
            dbg(command(&spec, "ours-cached", Path::new("/c"), Path::new("/r"), true).unwrap());
        assert!(oc.contains("\"auto\""), "{oc}");
        let o = dbg(command(&spec, "ours", Path::new("/c"), Path::new("/r"), true).unwrap());
        assert!(o.contains("\"off\""), "{o}");
        assert!(command(&spec, "nosuchtool", Path::new("/c"), Path::new("/r"), false).is_none());
    }
}
