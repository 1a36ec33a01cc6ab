//! Process entry for Packer: `describe`, the magic-cookie check, the choice
//! between the legacy 3-field handshake (Packer 1.6.6) and the 4-field one
//! (≥ 1.7), the listener, and serving one builder until Packer goes away.
//! Also `install`, which puts the binary where Packer looks for plugins.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;

use super::api::Builder;
use super::broker::Broker;
use super::gob::{DEBIAN_VENDOR_MARKER, OBJSPEC_NAME_DEBIAN, OBJSPEC_NAME_MODULE};
use super::server::{builder_handler, SpecEncoding};
use super::yamux::Session;
use super::{rpc, PackerError};

pub const COOKIE_KEY: &str = "PACKER_PLUGIN_MAGIC_COOKIE";
pub const COOKIE_VALUE: &str = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";
/// Forces the handshake: `legacy` (3 fields) or `modern` (4 fields).
pub const ENV_PROTO: &str = "PACKER_PLUGIN_NSPAWN_PROTO";
/// Forces the gob name of nested ObjectSpecs: `debian` or `module`.
pub const ENV_OBJSPEC: &str = "PACKER_PLUGIN_NSPAWN_OBJSPEC";
/// Log filter for stderr (tracing env-filter syntax), default `info`.
pub const ENV_LOG: &str = "PACKER_PLUGIN_NSPAWN_LOG";
/// The `builders` name meaning "the plugin's own name" in Packer ≥ 1.7.
pub const DEFAULT_NAME: &str = "-packer-default-plugin-name-";
/// Plugin version reported by `describe` and used in installed file names.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Source address used for the Packer ≥ 1.11 install layout.
pub const PLUGIN_SOURCE: &str = "github.com/packer-plugin-nspawn/nspawn";

/// Makes a builder instance for one plugin process.
pub type BuilderFactory = fn() -> Arc<dyn Builder>;

/// The builders this binary can serve, by name.
#[derive(Clone, Default)]
pub struct BuilderSet {
    pub builders: BTreeMap<String, BuilderFactory>,
    /// Served for `start builder -packer-default-plugin-name-`.
    pub default: Option<String>,
}

impl BuilderSet {
    pub fn with(mut self, name: &str, f: BuilderFactory) -> Self {
        self.builders.insert(name.into(), f);
        self
    }
}

/// `describe` output (the SDK's keys; Packer decodes them by name, order is irrelevant).
pub fn describe_json(set: &BuilderSet) -> String {
    let mut builders: Vec<String> = set.builders.keys().cloned().collect();
    if set.default.is_some() {
        builders.push(DEFAULT_NAME.into());
    }
    builders.sort();
    let mut m = serde_json::Map::new();
    m.insert("version".into(), VERSION.into());
    m.insert("sdk_version".into(), "nspawn-rs".into());
    m.insert("api_version".into(), "x5.0".into());
    m.insert("builders".into(), builders.into());
    m.insert("post_processors".into(), Vec::<String>::new().into());
    m.insert("provisioners".into(), Vec::<String>::new().into());
    m.insert("datasources".into(), Vec::<String>::new().into());
    m.insert("protocol_version".into(), "v2".into());
    serde_json::Value::Object(m).to_string()
}

/// How this launch talks to Packer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub builder: String,
    pub legacy_handshake: bool,
    pub encoding: SpecEncoding,
}

/// Version of the parent Packer (runs `<parent exe> version`).
fn parent_packer_version() -> Option<(u32, u32, u32)> {
    let ppid = std::os::unix::process::parent_id();
    let exe = std::fs::read_link(format!("/proc/{ppid}/exe")).ok()?;
    let out = std::process::Command::new(&exe)
        .arg("version")
        .env_remove(COOKIE_KEY)
        .env("CHECKPOINT_DISABLE", "1")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_packer_version(&text)
}

/// Parses "Packer v1.6.6" (also "Packer v1.10.0-dev").
pub fn parse_packer_version(text: &str) -> Option<(u32, u32, u32)> {
    let i = text.find("Packer v")?;
    let rest = &text[i + 8..];
    let mut parts = rest.splitn(3, '.');
    let maj = parts.next()?.parse().ok()?;
    let min = parts.next()?.parse().ok()?;
    let patch: String = parts
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((maj, min, patch.parse().ok()?))
}

/// Whether the parent Packer is Debian's GOPATH/vendor build (scans the
/// parent's executable in chunks for the vendored hcldec package path).
fn parent_is_vendored_build() -> bool {
    let ppid = std::os::unix::process::parent_id();
    let Ok(mut f) = std::fs::File::open(format!("/proc/{ppid}/exe")) else {
        return false;
    };
    contains_marker(&mut f, DEBIAN_VENDOR_MARKER)
}

/// Streams `r` looking for `needle` (chunks overlap by `needle.len() - 1`).
pub fn contains_marker(r: &mut impl std::io::Read, needle: &[u8]) -> bool {
    let mut buf = vec![0u8; 1 << 20];
    let keep = needle.len() - 1;
    let mut filled = 0;
    loop {
        let n = match r.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        filled += n;
        if buf[..filled].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        if filled > keep {
            buf.copy_within(filled - keep..filled, 0);
            filled = keep;
        }
    }
}

/// Decides builder name, handshake and ConfigSpec encoding (§2.6 of the
/// protocol notes). `argv0` is used for the legacy `packer-builder-NAME` launch.
pub fn plan(argv0: &str, args: &[String], set: &BuilderSet) -> Result<LaunchPlan, PackerError> {
    let protobuf = args.iter().any(|a| a == "--protobuf");
    let rest: Vec<&str> = args
        .iter()
        .filter(|a| *a != "--protobuf")
        .map(|s| s.as_str())
        .collect();
    let name = match rest.as_slice() {
        ["start", "builder", name] => name.to_string(),
        [] => {
            let base = Path::new(argv0)
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match base.strip_prefix("packer-builder-") {
                Some(n) => n.to_string(),
                None if set.builders.len() == 1 => set.builders.keys().next().unwrap().clone(),
                None => set.default.clone().unwrap_or_default(),
            }
        }
        other => {
            return Err(PackerError::Usage(format!(
                "unexpected arguments {other:?}"
            )))
        }
    };
    let name = if name == DEFAULT_NAME {
        set.default.clone().unwrap_or(name)
    } else {
        name
    };
    if !set.builders.contains_key(&name) {
        return Err(PackerError::UnknownBuilder(name));
    }
    let legacy = match std::env::var(ENV_PROTO).as_deref() {
        Ok("legacy") => true,
        Ok("modern") => false,
        _ if protobuf => false,
        _ => match parent_packer_version() {
            Some(v) => {
                tracing::debug!("parent packer version {v:?}");
                v < (1, 7, 0)
            }
            None => false,
        },
    };
    let encoding = if protobuf {
        SpecEncoding::Protobuf
    } else {
        let debian = match std::env::var(ENV_OBJSPEC).as_deref() {
            Ok("debian") => true,
            Ok("module") => false,
            _ => parent_is_vendored_build(),
        };
        SpecEncoding::Gob {
            objspec_name: if debian {
                OBJSPEC_NAME_DEBIAN
            } else {
                OBJSPEC_NAME_MODULE
            }
            .to_string(),
        }
    };
    Ok(LaunchPlan {
        builder: name,
        legacy_handshake: legacy,
        encoding,
    })
}

/// Marks every inherited descriptor above stderr close-on-exec, so that the
/// commands we start do not keep Packer's pipes open after Packer exits.
fn close_inherited_fds_on_exec() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: `fd` was listed in /proc/self/fd; borrowing it only for the
        // fcntl call does not take ownership or close it. A descriptor that
        // was the read_dir handle itself is gone by now and fails harmlessly.
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl(bfd, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(bfd, FcntlArg::F_SETFD(flags));
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(ENV_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}

/// Entry for every launch by Packer: `describe`, `start builder NAME
/// [--protobuf]`, or no arguments (Packer 1.6.6 running `packer-builder-NAME`).
pub fn plugin_main(argv0: &str, args: &[String], set: &BuilderSet) -> ExitCode {
    if args.first().map(String::as_str) == Some("describe") {
        println!("{}", describe_json(set));
        return ExitCode::SUCCESS;
    }
    if std::env::var(COOKIE_KEY).as_deref() != Ok(COOKIE_VALUE) {
        eprintln!(
            "This binary is a Packer plugin. Packer runs it for you; please do not execute it \
             directly.\nTo make Packer find it, run `{} install`.",
            Path::new(argv0)
                .file_name()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default()
        );
        return ExitCode::from(1);
    }
    init_logging();
    close_inherited_fds_on_exec();
    let plan = match plan(argv0, args, set) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        "serving builder {:?}, {} handshake, ConfigSpec as {:?}",
        plan.builder,
        if plan.legacy_handshake {
            "legacy"
        } else {
            "modern"
        },
        plan.encoding
    );
    let builder = (set.builders[&plan.builder])();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(serve(builder, plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(builder: Arc<dyn Builder>, plan: LaunchPlan) -> Result<(), PackerError> {
    let dir = tempfile::Builder::new()
        .prefix("packer-plugin-nspawn-")
        .tempdir()
        .map_err(|e| PackerError::Listen(e.to_string()))?;
    let path = dir.path().join("plugin.sock");
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| PackerError::Listen(format!("{}: {e}", path.display())))?;
    let line = if plan.legacy_handshake {
        format!("5|unix|{}\n", path.display())
    } else {
        format!("5|0|unix|{}\n", path.display())
    };
    {
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| PackerError::Listen(format!("writing the handshake: {e}")))?;
    }
    let (conn, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .map_err(|_| PackerError::Listen("Packer did not connect within 60 s".into()))?
        .map_err(|e| PackerError::Listen(e.to_string()))?;
    drop(listener);
    // Packer connects once; nothing is left to clean up if we are SIGKILLed.
    let _ = std::fs::remove_file(&path);
    let _ = dir.close();
    // Packer handles Ctrl-C/SIGTERM and cancels over RPC; like the Go SDK we
    // ignore those signals from here on.
    for kind in [
        tokio::signal::unix::SignalKind::interrupt(),
        tokio::signal::unix::SignalKind::terminate(),
    ] {
        if let Ok(mut sig) = tokio::signal::unix::signal(kind) {
            tokio::spawn(async move {
                let mut n = 0;
                while sig.recv().await.is_some() {
                    n += 1;
                    tracing::info!(
                        "received signal {kind:?} (count {n}); ignoring, Packer cancels over RPC"
                    );
                }
            });
        }
    }
    let (r, w) = conn.into_split();
    let (session, incoming, done) = Session::start(r, w, true, true);
    let broker = Broker::new(session, incoming);
    let main = broker
        .accept_timeout(0, Duration::from_secs(60))
        .await
        .map_err(|e| PackerError::Listen(format!("main RPC stream: {e}")))?;
    let handler = builder_handler(builder, broker.clone(), plan.encoding);
    tokio::spawn(rpc::serve(main, "builder", handler));
    match done.await {
        Ok(Some(e)) => Err(PackerError::Session(e.to_string())),
        _ => {
            tracing::info!("Packer closed the connection; exiting");
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// install
// ---------------------------------------------------------------------------

/// Packer's config dir: `$PACKER_CONFIG_DIR/.packer.d`, else `~/.packer.d`.
fn packer_config_dir() -> Result<PathBuf, PackerError> {
    if let Ok(d) = std::env::var("PACKER_CONFIG_DIR") {
        if !d.is_empty() {
            return Ok(PathBuf::from(d).join(".packer.d"));
        }
    }
    let home = std::env::var("HOME").map_err(|_| PackerError::Install("HOME is not set".into()))?;
    Ok(PathBuf::from(home).join(".packer.d"))
}

/// Which layouts `install` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallLayout {
    /// `<config>/plugins/packer-builder-nspawn` (Packer 1.6.6 … 1.10).
    Legacy,
    /// `<plugins>/github.com/…/nspawn/packer-plugin-nspawn_vX.Y.Z_x5.0_linux_amd64` + `_SHA256SUM` (≥ 1.7, required from 1.11).
    Modern,
}

/// The name of the builder inside a legacy single-component install.
pub const LEGACY_BUILDER_NAME: &str = "nspawn";

/// Copies `binary` into Packer's plugin folders; returns the files written.
pub fn install(binary: &Path, layouts: &[InstallLayout]) -> Result<Vec<PathBuf>, PackerError> {
    let data = std::fs::read(binary)
        .map_err(|e| PackerError::Install(format!("reading {}: {e}", binary.display())))?;
    let mut written = Vec::new();
    let write = |p: &Path, bytes: &[u8], mode: u32| -> Result<(), PackerError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = p.parent().unwrap();
        std::fs::create_dir_all(dir)
            .map_err(|e| PackerError::Install(format!("creating {}: {e}", dir.display())))?;
        let tmp = p.with_extension("tmp-install");
        std::fs::write(&tmp, bytes)
            .map_err(|e| PackerError::Install(format!("writing {}: {e}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| PackerError::Install(format!("chmod {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, p)
            .map_err(|e| PackerError::Install(format!("renaming to {}: {e}", p.display())))
    };
    for layout in layouts {
        match layout {
            InstallLayout::Legacy => {
                let p = packer_config_dir()?
                    .join("plugins")
                    .join(format!("packer-builder-{LEGACY_BUILDER_NAME}"));
                write(&p, &data, 0o755)?;
                written.push(p);
            }
            InstallLayout::Modern => {
                let base = match std::env::var("PACKER_PLUGIN_PATH") {
                    Ok(p) if !p.is_empty() => PathBuf::from(p.split(':').next().unwrap()),
                    _ => packer_config_dir()?.join("plugins"),
                };
                let arch = match std::env::consts::ARCH {
                    "x86_64" => "amd64",
                    "aarch64" => "arm64",
                    other => other,
                };
                let name = format!("packer-plugin-nspawn_v{VERSION}_x5.0_linux_{arch}");
                let p = base.join(PLUGIN_SOURCE).join(&name);
                write(&p, &data, 0o755)?;
                let sum = hex::encode(sha2::Sha256::digest(&data));
                let sp = base.join(PLUGIN_SOURCE).join(format!("{name}_SHA256SUM"));
                write(&sp, sum.as_bytes(), 0o644)?;
                written.push(p);
                written.push(sp);
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_scan_across_chunk_boundaries() {
        let mut data = vec![b'x'; (1 << 20) - 10];
        data.extend_from_slice(DEBIAN_VENDOR_MARKER);
        data.extend_from_slice(&[b'y'; 100]);
        assert!(contains_marker(&mut &data[..], DEBIAN_VENDOR_MARKER));
        assert!(!contains_marker(
            &mut &data[..(1 << 20)],
            DEBIAN_VENDOR_MARKER
        ));
        if let Ok(mut f) = std::fs::File::open("/usr/bin/packer") {
            // Debian's packer 1.6.6 is the vendor build
            assert!(contains_marker(&mut f, DEBIAN_VENDOR_MARKER));
        }
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_packer_version("Packer v1.6.6\n"), Some((1, 6, 6)));
        assert_eq!(
            parse_packer_version("Packer v1.10.0-dev (abc)"),
            Some((1, 10, 0))
        );
        assert_eq!(parse_packer_version("nope"), None);
    }

    fn dummy() -> Arc<dyn Builder> {
        unreachable!()
    }

    #[test]
    fn describe_and_plan() {
        let set = BuilderSet::default().with("hosttest", dummy);
        let d: serde_json::Value = serde_json::from_str(&describe_json(&set)).unwrap();
        assert_eq!(d["api_version"], "x5.0");
        assert_eq!(d["protocol_version"], "v2");
        assert_eq!(d["builders"], serde_json::json!(["hosttest"]));
        std::env::set_var(ENV_PROTO, "legacy");
        std::env::set_var(ENV_OBJSPEC, "debian");
        let p = plan("/x/packer-builder-hosttest", &[], &set).unwrap();
        assert_eq!(p.builder, "hosttest");
        assert!(p.legacy_handshake);
        assert_eq!(
            p.encoding,
            SpecEncoding::Gob {
                objspec_name: OBJSPEC_NAME_DEBIAN.into()
            }
        );
        let args: Vec<String> = ["start", "builder", "--protobuf", "hosttest"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        std::env::remove_var(ENV_PROTO);
        let p = plan("/x/packer-plugin-nspawn", &args, &set).unwrap();
        assert!(!p.legacy_handshake);
        assert_eq!(p.encoding, SpecEncoding::Protobuf);
        assert!(plan("/x/packer-builder-nope", &[], &set).is_err());
        std::env::remove_var(ENV_OBJSPEC);
    }
}
