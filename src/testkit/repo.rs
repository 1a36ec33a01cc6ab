//! A signed Debian-style archive generated on the spot: `pool/`, `Packages`
//! (plain, .gz, .xz, plus by-hash copies), `Release`, `InRelease`,
//! `Release.gpg` and the public keyring that verifies them.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::deb::DebBuilder;
use super::signing::TestKey;
use crate::archive::deb822;
use crate::archive::release::format_rfc2822;
use crate::fetch::sha256_hex;

/// One package published in the archive.
#[derive(Debug, Clone)]
pub struct Published {
    pub package: String,
    pub version: String,
    pub arch: String,
    pub component: String,
    /// Path relative to the archive root.
    pub filename: String,
    pub stanza: String,
}

/// A test archive under `root`.
pub struct TestRepo {
    pub root: PathBuf,
    pub suite: String,
    pub codename: String,
    pub arch: String,
    key: TestKey,
    packages: Vec<Published>,
    /// Extra Release header lines (e.g. `Valid-Until: ...`).
    pub extra_release_fields: Vec<String>,
}

impl TestRepo {
    /// An empty archive for `suite` (also its codename) and `arch`.
    pub fn new(root: &Path, suite: &str, arch: &str) -> TestRepo {
        std::fs::create_dir_all(root).unwrap();
        TestRepo {
            root: root.to_path_buf(),
            suite: suite.into(),
            codename: suite.into(),
            arch: arch.into(),
            key: TestKey::generate("Test Archive Signing Key <archive@example.invalid>"),
            packages: Vec::new(),
            extra_release_fields: Vec::new(),
        }
    }

    /// `file://` URL of the archive.
    pub fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    pub fn key(&self) -> &TestKey {
        &self.key
    }

    /// Writes the binary public keyring and returns its path.
    pub fn keyring(&self) -> PathBuf {
        let p = self.root.join("archive-keyring.gpg");
        std::fs::write(&p, self.key.public_bytes()).unwrap();
        p
    }

    /// Builds `deb` and puts it into `pool/<component>/...`.
    pub fn add(&mut self, component: &str, deb: &DebBuilder) -> Published {
        let bytes = deb.build();
        let stanza = deb.control_stanza();
        let p = deb822::paragraphs(&stanza).next().expect("control stanza");
        let package = p.get("Package").unwrap().to_string();
        let version = p.get("Version").unwrap().to_string();
        let arch = p.get("Architecture").unwrap().to_string();
        let first = package.chars().next().unwrap();
        let filename = format!(
            "pool/{component}/{first}/{package}/{package}_{}_{arch}.deb",
            version.replace(':', "%3a")
        );
        let path = self.root.join(&filename);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let full = format!(
            "{}\nFilename: {filename}\nSize: {}\nSHA256: {}\n",
            stanza.trim_end(),
            bytes.len(),
            sha256_hex(&bytes)
        );
        self.packages
            .retain(|x| !(x.package == package && x.component == component));
        let published = Published {
            package,
            version,
            arch,
            component: component.into(),
            filename,
            stanza: full,
        };
        self.packages.push(published.clone());
        published
    }

    /// Writes the indices, Release, InRelease and Release.gpg.
    pub fn publish(&self) {
        let dists = self.root.join("dists").join(&self.suite);
        let mut components: Vec<&str> =
            self.packages.iter().map(|p| p.component.as_str()).collect();
        if components.is_empty() {
            components.push("main");
        }
        components.sort();
        components.dedup();
        let mut sums = Vec::new();
        for comp in &components {
            let mut text = String::new();
            for p in self.packages.iter().filter(|p| p.component == *comp) {
                text.push_str(&p.stanza);
                text.push('\n');
            }
            let rel_dir = format!("{comp}/binary-{}", self.arch);
            let dir = dists.join(&rel_dir);
            std::fs::create_dir_all(dir.join("by-hash/SHA256")).unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(text.as_bytes()).unwrap();
            let gz = gz.finish().unwrap();
            let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
            xz.write_all(text.as_bytes()).unwrap();
            let xz = xz.finish().unwrap();
            for (name, data) in [
                ("Packages", text.as_bytes().to_vec()),
                ("Packages.gz", gz),
                ("Packages.xz", xz),
            ] {
                let h = sha256_hex(&data);
                std::fs::write(dir.join(name), &data).unwrap();
                std::fs::write(dir.join("by-hash/SHA256").join(&h), &data).unwrap();
                sums.push(format!(" {h} {} {rel_dir}/{name}", data.len()));
            }
        }
        let mut release = format!(
            "Origin: Test\nLabel: Test\nSuite: {}\nCodename: {}\nDate: {}\nAcquire-By-Hash: yes\n\
             Architectures: {}\nComponents: {}\nDescription: generated test archive\n",
            self.suite,
            self.codename,
            format_rfc2822(std::time::SystemTime::now()),
            self.arch,
            components.join(" ")
        );
        for f in &self.extra_release_fields {
            release.push_str(f);
            release.push('\n');
        }
        release.push_str("SHA256:\n");
        for s in sums {
            release.push_str(&s);
            release.push('\n');
        }
        std::fs::create_dir_all(&dists).unwrap();
        std::fs::write(dists.join("Release"), &release).unwrap();
        std::fs::write(dists.join("InRelease"), self.key.clearsign(&release)).unwrap();
        std::fs::write(
            dists.join("Release.gpg"),
            self.key.detached_sign(release.as_bytes()),
        )
        .unwrap();
    }

    pub fn packages(&self) -> &[Published] {
        &self.packages
    }
}

/// `security.capability` v2 value granting cap_net_raw (bit 13) permitted + effective.
pub const CAP_NET_RAW_V2: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// A small archive that looks like a Debian suite to the resolver: a required
/// set with merged-/usr paths, a setuid file, a hardlink, a conffile, a
/// maintainer script, an Essential package and a versioned dependency.
pub fn sample_repo(root: &Path, suite: &str) -> TestRepo {
    let mut r = TestRepo::new(root, suite, "amd64");
    let req = |d: DebBuilder| d.control_field("Priority", "required");
    r.add(
        "main",
        &req(DebBuilder::new("base-files", "13.0", "amd64"))
            .control_field("Essential", "yes")
            .control_field("Pre-Depends", "awk")
            .dir("etc", 0o755)
            .conffile("etc/issue", b"Test GNU/Linux\n")
            .file("usr/lib/os-release", 0o644, b"ID=test\n")
            .dir("var/local", 0o2775),
    );
    r.add(
        "main",
        &req(DebBuilder::new("mawk", "1.3.4", "amd64"))
            .control_field("Provides", "awk")
            .control_field("Depends", "libc6 (>= 2.30)")
            .file("usr/bin/mawk", 0o755, b"#!/bin/sh\necho mawk\n")
            // A v2 file capability (cap_net_raw+ep), as real root would write it.
            .file("usr/bin/ping", 0o755, b"ping")
            .xattr("usr/bin/ping", "security.capability", &CAP_NET_RAW_V2)
            .symlink("usr/bin/awk", "mawk"),
    );
    r.add(
        "main",
        &DebBuilder::new("libc6", "2.36-9", "amd64")
            .control_field("Priority", "optional")
            .control_field("Multi-Arch", "same")
            .file(
                "lib/x86_64-linux-gnu/libc.so.6",
                0o755,
                b"\x7fELF fake libc",
            )
            .symlink(
                "lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
    );
    r.add(
        "main",
        &req(DebBuilder::new("gzip", "1.12", "amd64"))
            .control_field("Essential", "yes")
            .file("bin/gunzip", 0o755, b"#!/bin/sh\necho gunzip\n")
            .hardlink("bin/uncompress", "bin/gunzip"),
    );
    r.add(
        "main",
        &req(DebBuilder::new("login", "1:4.13", "amd64"))
            .control_field("Pre-Depends", "libc6")
            .file_owned("bin/su", 0o4755, 0, 0, b"su")
            .file_owned("usr/bin/expiry", 0o2755, 0, 42, b"expiry")
            .maintainer_script("postinst", "#!/bin/sh\nexit 0\n"),
    );
    r.add(
        "main",
        &DebBuilder::new("apt", "2.6.1", "amd64")
            .control_field("Priority", "important")
            .control_field("Depends", "gpgv | gpgv2")
            .file("usr/bin/apt", 0o755, b"apt"),
    );
    r.add(
        "main",
        &DebBuilder::new("gpgv", "2.2.40", "amd64")
            .control_field("Priority", "optional")
            .file("usr/bin/gpgv", 0o755, b"gpgv"),
    );
    r.add(
        "main",
        &DebBuilder::new("unrelated", "1.0", "amd64")
            .control_field("Priority", "optional")
            .file("usr/bin/unrelated", 0o755, b"x"),
    );
    r.publish();
    r
}
