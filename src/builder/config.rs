//! The `nspawn` builder's options: schema, decoding, defaults and validation.
//! Every error names its option, so `packer validate` points at the culprit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::packer::{Config, ConfigSpec, CtyType, ObjectSpec};
use crate::resolve::Variant;

/// Default `machines_dir`, as the original plugin (and machinectl) use.
pub const DEFAULT_MACHINES_DIR: &str = "/var/lib/machines";
/// Default `timeout` for boot and poweroff.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Packages a booted machine needs when the bootstrap would not bring systemd.
pub const BOOT_PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus"];

/// The options as they come from the template.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<String>,
    import: Option<String>,
    clone: Option<String>,
    suite: Option<String>,
    mirror: Option<String>,
    variant: Option<String>,
    cache_dir: Option<String>,
    machines_dir: Option<String>,
    timeout: Option<String>,
    components: Option<Vec<String>>,
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    keyring: Option<String>,
    private_users: Option<bool>,
    boot: Option<bool>,
    export: Option<String>,
    nspawn_args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    scrub: Option<bool>,
    cache: Option<String>,
    cache_limit: Option<String>,
}

/// What the build starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Native bootstrap from the mirror.
    Bootstrap,
    /// A file, directory or http(s) URL.
    Import(String),
    /// A machine under `machines_dir`.
    Clone(String),
}

/// The settled, validated options.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Machine name (`name`, else the build name).
    pub name: String,
    pub source: Source,
    pub suite: Option<String>,
    pub mirror: Option<String>,
    pub variant: Variant,
    pub cache_dir: PathBuf,
    pub machines_dir: PathBuf,
    pub timeout: Duration,
    pub components: Vec<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub keyring: Option<PathBuf>,
    pub private_users: bool,
    pub boot: bool,
    /// Where to export (format from the suffix, see [`crate::image::export_format`]).
    pub export: Option<PathBuf>,
    pub nspawn_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub scrub: bool,
    /// How the base-tree cache under `cache_dir` is used.
    pub cache: crate::cache::Mode,
    /// Its size limit in bytes (0 = none).
    pub cache_limit: u64,
    /// Packer's `-force`.
    pub force: bool,
    /// Packer's `-on-error` (`abort` keeps the machine).
    pub on_error: String,
}

/// The HCL2 schema of the options.
pub fn spec() -> ConfigSpec {
    let s = CtyType::String;
    let list = || CtyType::list(CtyType::String);
    ObjectSpec::new()
        .attr("name", s.clone())
        .attr("import", s.clone())
        .attr("clone", s.clone())
        .attr("suite", s.clone())
        .attr("mirror", s.clone())
        .attr("variant", s.clone())
        .attr("cache_dir", s.clone())
        .attr("machines_dir", s.clone())
        .attr("timeout", s.clone())
        .attr("components", list())
        .attr("include", list())
        .attr("exclude", list())
        .attr("keyring", s.clone())
        .attr("private_users", CtyType::Bool)
        .attr("boot", CtyType::Bool)
        .attr("export", s.clone())
        .attr("nspawn_args", list())
        .attr("env", CtyType::map(CtyType::String))
        .attr("scrub", CtyType::Bool)
        .attr("cache", s.clone())
        .attr("cache_limit", s.clone())
}

/// Parses Go's `time.ParseDuration` syntax ("20s", "1m30s", "1.5h", "500ms").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: missing unit (ns, us, ms, s, m, h)"))?;
        if num_len == 0 {
            return Err(format!("{text:?}: expected a number"));
        }
        let n: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{text:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("{text:?}: unknown unit {u:?}")),
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Ok(Duration::from_secs_f64(total))
}

fn machine_name_ok(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} must have 1 to 64 characters"));
    }
    if !name.chars().all(ok) || name.starts_with(['.', '-']) {
        return Err(format!(
            "{name:?}: only letters, digits, '-', '_' and '.' (not first) are allowed"
        ));
    }
    Ok(())
}

fn nonempty_list(errs: &mut Vec<String>, opt: &str, v: Option<Vec<String>>) -> Vec<String> {
    let v: Vec<String> = v
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| {
            s.split(',')
                .map(|p| p.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    if v.iter().any(|s| s.is_empty()) {
        errs.push(format!("{opt}: empty entry"));
    }
    v.into_iter().filter(|s| !s.is_empty()).collect()
}

/// Decodes and validates; every problem at once, each naming its option.
pub fn settle(config: &Config) -> Result<(Settings, Vec<String>), Vec<String>> {
    let raw: Raw = config.decode().map_err(|e| vec![e])?;
    let mut errs = Vec::new();
    let mut warnings = Vec::new();

    let name = raw
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| config.packer.build_name.clone());
    if let Err(e) = machine_name_ok(&name) {
        if raw.name.is_some() {
            errs.push(format!("name: {e}"));
        } else {
            errs.push(format!(
                "name: the build name {e}; set `name` to a valid machine name"
            ));
        }
    }

    let source = match (raw.import.clone(), raw.clone.clone()) {
        (Some(_), Some(_)) => {
            errs.push("import and clone: only one of them may be set".into());
            Source::Bootstrap
        }
        (Some(i), None) => {
            if i.is_empty() {
                errs.push("import: must not be empty".into());
            } else if i.contains("://") && !(i.starts_with("http://") || i.starts_with("https://"))
            {
                errs.push(format!(
                    "import: {i:?}: only http:// and https:// URLs or local paths"
                ));
            }
            Source::Import(i)
        }
        (None, Some(c)) => {
            if let Err(e) = machine_name_ok(&c) {
                errs.push(format!("clone: {e}"));
            }
            Source::Clone(c)
        }
        (None, None) => Source::Bootstrap,
    };
    if source != Source::Bootstrap {
        for (opt, set) in [
            ("suite", raw.suite.is_some()),
            ("mirror", raw.mirror.is_some()),
            ("variant", raw.variant.is_some()),
            ("components", raw.components.is_some()),
            ("include", raw.include.is_some()),
            ("exclude", raw.exclude.is_some()),
            ("keyring", raw.keyring.is_some()),
        ] {
            if set {
                warnings.push(format!(
                    "{opt}: ignored, the build starts from import/clone, not a bootstrap"
                ));
            }
        }
    }

    let variant = match raw.variant.as_deref() {
        None | Some("") => Variant::default(),
        Some(v) => v.parse().unwrap_or_else(|_| {
            errs.push(format!(
                "variant: {v:?} is not one of minbase, buildd, default"
            ));
            Variant::default()
        }),
    };
    if let Some(m) = &raw.mirror {
        if !(m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:/")) {
            errs.push(format!(
                "mirror: {m:?} must be an http://, https:// or file:/ URL"
            ));
        }
    }
    if let Some(s) = &raw.suite {
        if s.is_empty() || s.contains(['/', ' ']) {
            errs.push(format!("suite: {s:?} is not a suite or codename"));
        }
    }
    let timeout = match raw.timeout.as_deref() {
        None | Some("") => DEFAULT_TIMEOUT,
        Some(t) => match parse_duration(t) {
            Ok(d) if d.is_zero() => {
                errs.push("timeout: must be more than 0".into());
                DEFAULT_TIMEOUT
            }
            Ok(d) => d,
            Err(e) => {
                errs.push(format!(
                    "timeout: {e}; use Packer's duration syntax, e.g. \"20s\" or \"1m30s\""
                ));
                DEFAULT_TIMEOUT
            }
        },
    };
    let components = nonempty_list(&mut errs, "components", raw.components);
    let include = nonempty_list(&mut errs, "include", raw.include);
    let exclude = nonempty_list(&mut errs, "exclude", raw.exclude);
    let keyring = raw.keyring.map(PathBuf::from);
    if let Some(k) = &keyring {
        if !k.exists() {
            errs.push(format!("keyring: {} does not exist", k.display()));
        }
    }
    let abs = |errs: &mut Vec<String>, opt: &str, v: Option<String>, default: &str| {
        let p = PathBuf::from(v.filter(|s| !s.is_empty()).unwrap_or(default.into()));
        if !p.is_absolute() {
            errs.push(format!("{opt}: {} must be an absolute path", p.display()));
        }
        p
    };
    let machines_dir = abs(
        &mut errs,
        "machines_dir",
        raw.machines_dir,
        DEFAULT_MACHINES_DIR,
    );
    let cache_dir = abs(
        &mut errs,
        "cache_dir",
        raw.cache_dir,
        "/var/cache/apt/archives",
    );
    let export = match raw.export.filter(|s| !s.is_empty()) {
        None => None,
        Some(e) => {
            let p = PathBuf::from(&e);
            let p = if p.is_absolute() {
                p
            } else {
                std::env::current_dir().unwrap_or_default().join(p)
            };
            match crate::image::export_format(&p) {
                Ok(_) => {
                    if p.parent() == Some(machines_dir.as_path()) {
                        errs.push(format!(
                            "export: {} is inside machines_dir; pick another place",
                            p.display()
                        ));
                    }
                    Some(p)
                }
                Err(m) => {
                    errs.push(format!(
                        "export: {m} (use a directory path, .tar, .tar.zst, .tar.xz or .tar.gz)"
                    ));
                    None
                }
            }
        }
    };
    let nspawn_args = raw.nspawn_args.unwrap_or_default();
    for a in &nspawn_args {
        let flag = a.split('=').next().unwrap_or("");
        if matches!(
            flag,
            "-b" | "--boot"
                | "-D"
                | "--directory"
                | "-M"
                | "--machine"
                | "--register"
                | "--notify-ready"
                | "--keep-unit"
                | "-U"
                | "--private-users"
                | "-i"
                | "--image"
                | "--as-pid2"
                | "-a"
        ) {
            errs.push(format!(
                "nspawn_args: {a:?} is set by the builder itself and cannot be overridden"
            ));
        }
    }
    let boot = raw.boot.unwrap_or(true);
    if !boot && !nspawn_args.is_empty() {
        warnings.push("nspawn_args: ignored with boot = false".into());
    }
    let mut env = Vec::new();
    for (k, v) in raw.env.unwrap_or_default() {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            errs.push(format!("env: bad variable name {k:?}"));
        } else {
            env.push((k, v));
        }
    }
    let cache = match raw
        .cache
        .as_deref()
        .unwrap_or("auto")
        .parse::<crate::cache::Mode>()
    {
        Ok(m) => m,
        Err(_) => {
            errs.push(format!(
                "cache: expected \"auto\", \"refresh\" or \"off\", got {:?}",
                raw.cache.unwrap_or_default()
            ));
            crate::cache::Mode::Off
        }
    };
    let cache_limit = match crate::cache::parse_size(raw.cache_limit.as_deref().unwrap_or("20G")) {
        Ok(n) => n,
        Err(_) => {
            errs.push(format!(
                "cache_limit: {:?} is not a size like \"500M\", \"20G\" or \"0\" (no limit)",
                raw.cache_limit.unwrap_or_default()
            ));
            0
        }
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok((
        Settings {
            name,
            source,
            suite: raw.suite.filter(|s| !s.is_empty()),
            mirror: raw.mirror.filter(|s| !s.is_empty()),
            variant,
            cache_dir,
            machines_dir,
            timeout,
            components,
            include,
            exclude,
            keyring,
            private_users: raw.private_users.unwrap_or(false),
            boot,
            export,
            nspawn_args,
            env,
            scrub: raw.scrub.unwrap_or(true),
            cache,
            cache_limit,
            force: config.packer.force,
            on_error: config.packer.on_error.clone(),
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> Config {
        let mut c = Config::default();
        c.values = v.as_object().unwrap().clone();
        c.packer.build_name = "base".into();
        c
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("20").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn defaults() {
        let (s, w) = settle(&cfg(json!({}))).unwrap();
        assert!(w.is_empty());
        assert_eq!(s.name, "base");
        assert_eq!(s.source, Source::Bootstrap);
        assert_eq!(s.machines_dir, PathBuf::from("/var/lib/machines"));
        assert_eq!(s.timeout, Duration::from_secs(20));
        assert!(s.boot && s.scrub && !s.private_users);
        assert_eq!(s.cache, crate::cache::Mode::Auto);
        assert_eq!(s.cache_limit, 20 << 30);
    }

    #[test]
    fn errors_name_options() {
        let errs = settle(&cfg(json!({
            "import": "/", "clone": "x", "timeout": "soon", "variant": "huge",
            "export": "/tmp/a.tar.bz2", "machines_dir": "rel", "nspawn_args": ["--boot"],
            "cache": "sometimes", "cache_limit": "lots"
        })))
        .unwrap_err();
        let all = errs.join("\n");
        for opt in [
            "import and clone",
            "timeout:",
            "variant:",
            "export:",
            "machines_dir:",
            "nspawn_args:",
            "cache: expected",
            "cache_limit:",
        ] {
            assert!(all.contains(opt), "{opt} missing in {all}");
        }
    }
}
