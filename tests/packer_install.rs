//! `packer-plugin-nspawn install` writes the layouts Packer 1.6.6 and
//! Packer ≥ 1.11 look for.

use std::process::Command;

use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_packer-plugin-nspawn");

#[test]
fn install_writes_legacy_and_modern_layouts() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("install")
        .env("HOME", d.path())
        .env("PACKER_CONFIG_DIR", d.path())
        .env_remove("PACKER_PLUGIN_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plugins = d.path().join(".packer.d/plugins");
    let legacy = plugins.join("packer-builder-nspawn");
    assert!(legacy.exists());
    let version = env!("CARGO_PKG_VERSION");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let name = format!("packer-plugin-nspawn_v{version}_x5.0_linux_{arch}");
    let modern = plugins
        .join("github.com/packer-plugin-nspawn/nspawn")
        .join(&name);
    let sum = std::fs::read_to_string(modern.with_file_name(format!("{name}_SHA256SUM"))).unwrap();
    let bytes = std::fs::read(&modern).unwrap();
    assert_eq!(sum, hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(bytes, std::fs::read(BIN).unwrap());
    // the installed copy answers `describe` with the version in its file name
    let d2 = Command::new(&modern).arg("describe").output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&d2.stdout).unwrap();
    assert_eq!(v["version"], version);
    assert_eq!(v["api_version"], "x5.0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("packer-builder-nspawn"), "{stdout}");
}

#[test]
fn install_honours_packer_plugin_path() {
    let d = tempfile::tempdir().unwrap();
    let pp = d.path().join("pp");
    let out = Command::new(BIN)
        .args(["install", "--modern"])
        .env("HOME", d.path())
        .env("PACKER_PLUGIN_PATH", &pp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pp.join("github.com/packer-plugin-nspawn/nspawn").is_dir());
    assert!(!d
        .path()
        .join(".packer.d/plugins/packer-builder-nspawn")
        .exists());
}
