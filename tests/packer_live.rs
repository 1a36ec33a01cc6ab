//! End-to-end tests of the plugin protocol with the real Debian `packer`
//! 1.6.6, using the `hosttest` builder (its communicator runs commands on the
//! host in a scratch directory). Skipped when /usr/bin/packer is absent.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PACKER: &str = "/usr/bin/packer";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Option<Env> {
        if !Path::new(PACKER).exists() {
            eprintln!("SKIP: {PACKER} is not installed");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("packer-live-")
            .tempdir()
            .unwrap();
        let plugins = dir.path().join("cfg/.packer.d/plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_packer-plugin-nspawn"),
            plugins.join("packer-builder-hosttest"),
        )
        .unwrap();
        Some(Env { dir })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn work(&self) -> PathBuf {
        self.path("work")
    }

    fn write(&self, name: &str, text: &str) {
        let p = self.work().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn packer(&self, args: &[&str]) -> Command {
        let mut c = Command::new(PACKER);
        c.args(args)
            .current_dir(self.work())
            .env("HOME", self.path("home"))
            .env("PACKER_CONFIG_DIR", self.path("cfg"))
            .env("CHECKPOINT_DISABLE", "1")
            .env("PACKER_LOG", "1")
            .env("PACKER_LOG_PATH", self.path("packer.log"))
            .env_remove("PACKER_PLUGIN_PATH")
            .env_remove("PACKER_PLUGIN_NSPAWN_PROTO")
            .env_remove("PACKER_PLUGIN_NSPAWN_OBJSPEC")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out: Output = self.packer(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("packer.log")).unwrap_or_default()
    }
}

fn scratch_of(env: &Env) -> String {
    env.path("scratch").display().to_string()
}

#[test]
fn hcl_build_options_provisioners_and_manifest() {
    let Some(env) = Env::new() else { return };
    let scratch = scratch_of(&env);
    env.write("up.txt", "uploaded\n");
    std::fs::set_permissions(
        env.work().join("up.txt"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(env.work().join("big.bin"), &big).unwrap();
    env.write("updir/a.txt", "one\n");
    env.write("updir/sub/b.txt", "two\n");
    env.write(
        "t.pkr.hcl",
        &format!(
            r#"
source "hosttest" "x" {{
  scratch_dir = "{scratch}"
  message     = "hello"
  count       = 42
  verbose     = true
  tags        = ["a", "b"]
  labels      = {{ k = "v" }}
  extra {{
    note = "nested-note"
  }}
}}
build {{
  sources = ["source.hosttest.x"]
  provisioner "shell" {{
    inline           = ["echo out-line", "echo err-line 1>&2", "echo scratch=$(pwd)", "exit 3"]
    valid_exit_codes = [0, 3]
  }}
  provisioner "file" {{
    source      = "up.txt"
    destination = "{scratch}/up-copy.txt"
  }}
  provisioner "file" {{
    source      = "updir"
    destination = "{scratch}/dirdst"
  }}
  provisioner "file" {{
    source      = "{scratch}/up-copy.txt"
    destination = "down.txt"
    direction   = "download"
  }}
  provisioner "file" {{
    source      = "big.bin"
    destination = "{scratch}/big.bin"
  }}
  provisioner "file" {{
    source      = "{scratch}/big.bin"
    destination = "big-back.bin"
    direction   = "download"
  }}
  provisioner "file" {{
    source      = "{scratch}/dirdst/updir/"
    destination = "downdir"
    direction   = "download"
  }}
  post-processor "manifest" {{
    output = "manifest.json"
  }}
}}
"#
        ),
    );
    let (ok, out) = env.run(&["build", "t.pkr.hcl"]);
    assert!(
        ok,
        "packer build failed:\n{out}\n--- log ---\n{}",
        env.log()
    );
    // 1.5 MB each way: yamux flow control beyond the 256 KiB window with Go's yamux
    assert_eq!(std::fs::read(format!("{scratch}/big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(env.work().join("big-back.bin")).unwrap(), big);
    // DownloadDir: a source ending in "/" copies its contents
    assert_eq!(
        std::fs::read_to_string(env.work().join("downdir/sub/b.txt")).unwrap(),
        "two\n"
    );
    assert!(
        out.contains(
            "message=hello count=42 verbose=true tags=a,b labels=k=v extra.note=nested-note"
        ),
        "{out}"
    );
    assert!(out.contains("out-line"), "{out}");
    assert!(out.contains("err-line"), "{out}");
    assert!(out.contains(&format!("scratch={scratch}")), "{out}");
    let mode = std::fs::metadata(format!("{scratch}/up-copy.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o751);
    assert_eq!(
        std::fs::read_to_string(format!("{scratch}/dirdst/updir/sub/b.txt")).unwrap(),
        "two\n"
    );
    assert_eq!(
        std::fs::read_to_string(env.work().join("down.txt")).unwrap(),
        "uploaded\n"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.work().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["builds"][0]["files"][0]["name"],
        format!("{scratch}/artifact.txt")
    );
    assert_eq!(manifest["builds"][0]["builder_type"], "hosttest");
}

#[test]
fn hcl_exit_code_2_fails_the_build() {
    let Some(env) = Env::new() else { return };
    let scratch = scratch_of(&env);
    env.write(
        "t.pkr.hcl",
        &format!(
            r#"
source "hosttest" "x" {{
  scratch_dir = "{scratch}"
}}
build {{
  sources = ["source.hosttest.x"]
  provisioner "shell" {{
    inline           = ["echo before-failure", "exit 2"]
    valid_exit_codes = [0, 3]
  }}
}}
"#
        ),
    );
    let (ok, out) = env.run(&["build", "t.pkr.hcl"]);
    assert!(!ok, "build should fail:\n{out}");
    assert!(out.contains("before-failure"), "{out}");
    assert!(out.contains("non-zero exit status: 2"), "{out}");
}

#[test]
fn json_template_is_interpolated() {
    let Some(env) = Env::new() else { return };
    let scratch = scratch_of(&env);
    env.write(
        "t.json",
        &format!(
            r#"{{
  "variables": {{ "x": "from-user" }},
  "builders": [{{
    "type": "hosttest",
    "name": "jb",
    "scratch_dir": "{scratch}",
    "message": "{{{{user `x`}}}}-{{{{build_name}}}}-{{{{upper `y`}}}}",
    "count": 7,
    "tags": ["t1", "{{{{build_type}}}}"]
  }}],
  "provisioners": [{{ "type": "shell", "inline": ["echo json-ok {{{{build `HostTestScratch`}}}}"] }}]
}}"#
        ),
    );
    let (ok, out) = env.run(&["build", "t.json"]);
    assert!(
        ok,
        "packer build failed:\n{out}\n--- log ---\n{}",
        env.log()
    );
    assert!(out.contains("message=from-user-jb-Y count=7"), "{out}");
    assert!(out.contains("tags=t1,hosttest"), "{out}");
    assert!(out.contains(&format!("json-ok {scratch}")), "{out}");
}

#[test]
fn validate_reports_bad_option() {
    let Some(env) = Env::new() else { return };
    env.write(
        "t.pkr.hcl",
        r#"
source "hosttest" "x" {
  mode = "bogus"
}
build {
  sources = ["source.hosttest.x"]
}
"#,
    );
    let (ok, out) = env.run(&["validate", "t.pkr.hcl"]);
    assert!(!ok, "validate should fail:\n{out}");
    assert!(
        out.contains("mode: must be \"normal\" or \"fail\", got \"bogus\""),
        "{out}"
    );
    // JSON template: unknown key and bad type are named too
    env.write(
        "t.json",
        r#"{"builders": [{"type": "hosttest", "count": "many", "bogus_key": 1}]}"#,
    );
    let (ok, out) = env.run(&["validate", "t.json"]);
    assert!(!ok, "validate should fail:\n{out}");
    assert!(out.contains("count: expected a number"), "{out}");
    assert!(
        out.contains("unknown configuration key: \"bogus_key\""),
        "{out}"
    );
}

fn plugin_processes(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn sigterm_cancels_the_build() {
    let Some(env) = Env::new() else { return };
    let scratch = scratch_of(&env);
    env.write(
        "t.pkr.hcl",
        &format!(
            r#"
source "hosttest" "x" {{
  scratch_dir = "{scratch}"
}}
build {{
  sources = ["source.hosttest.x"]
  provisioner "shell" {{
    inline = ["echo long-provisioner-started", "sleep 120", "echo not-reached"]
  }}
}}
"#
        ),
    );
    let mut child = env
        .packer(&["build", "t.pkr.hcl"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let shared = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sh = shared.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sh
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    // wait for the provisioner to run
    let start = Instant::now();
    while !shared.lock().unwrap().contains("long-provisioner-started") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "provisioner did not start:\n{}\n{}",
            shared.lock().unwrap(),
            env.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let marker = env.path("cfg").display().to_string();
    assert!(
        !plugin_processes(&marker).is_empty(),
        "plugin is not running"
    );
    nix_kill(child.id());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("packer did not stop within 10 s of SIGTERM:\n{}", env.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    reader.join().unwrap();
    let out = shared.lock().unwrap().clone();
    assert!(!status.success(), "{out}");
    assert!(!out.contains("not-reached"), "{out}");
    let log = env.log();
    assert!(log.contains("Builder.Cancel received"), "{log}");
    // our Hook.Cancel made Packer cancel the running provisioner
    assert!(
        log.contains("Cancelling provisioner after context cancellation"),
        "{log}"
    );
    // the plugin process is gone too
    let t = Instant::now();
    while !plugin_processes(&marker).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "plugin still running");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nix_kill(pid: u32) {
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn long_build_survives_keepalive() {
    let Some(env) = Env::new() else { return };
    let scratch = scratch_of(&env);
    env.write(
        "t.pkr.hcl",
        &format!(
            r#"
source "hosttest" "x" {{
  scratch_dir   = "{scratch}"
  sleep_seconds = 46
}}
build {{
  sources = ["source.hosttest.x"]
  provisioner "shell" {{
    inline = ["echo after-long-sleep"]
  }}
}}
"#
        ),
    );
    let (ok, out) = env.run(&["build", "t.pkr.hcl"]);
    assert!(
        ok,
        "packer build failed:\n{out}\n--- log ---\n{}",
        env.log()
    );
    assert!(out.contains("after-long-sleep"), "{out}");
}

#[test]
fn multi_component_plugin_and_prepare_warning() {
    let Some(env) = Env::new() else { return };
    // Packer 1.6.6 runs `describe`, registers `nspawn-hosttest` and starts
    // the binary as `start builder hosttest`.
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_packer-plugin-nspawn"),
        env.path("cfg/.packer.d/plugins/packer-plugin-nspawn"),
    )
    .unwrap();
    env.write(
        "t.pkr.hcl",
        r#"
source "nspawn-hosttest" "m" {
  message = "multi"
}
build {
  sources = ["source.nspawn-hosttest.m"]
  provisioner "shell" {
    inline = ["echo multi-ok"]
  }
}
"#,
    );
    let (ok, out) = env.run(&["build", "t.pkr.hcl"]);
    assert!(
        ok,
        "packer build failed:\n{out}\n--- log ---\n{}",
        env.log()
    );
    assert!(
        out.contains("scratch_dir is not set; a temporary directory will be used"),
        "{out}"
    );
    assert!(out.contains("message=multi"), "{out}");
    assert!(out.contains("multi-ok"), "{out}");
    assert!(
        env.log().contains("start builder hosttest")
            || env.log().contains("\"start\", \"builder\""),
        "{}",
        env.log()
    );
    // the temporary scratch directory is named in the output; clean it up
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("hosttest: scratch directory "))
    {
        let dir = line
            .rsplit(' ')
            .next()
            .unwrap()
            .trim_end_matches("\u{1b}[0m");
        if dir.starts_with("/tmp/hosttest-") {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
