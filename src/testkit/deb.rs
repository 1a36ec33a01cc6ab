//! Synthetic `.deb` generator for tests and benches.
//!
//! [`DebBuilder`] produces byte-exact, deterministic Debian binary packages in memory: an `ar`
//! archive holding `debian-binary`, `control.tar.*` and `data.tar.*`, with the member and
//! entry layout `dpkg-deb --build` uses (GNU tar headers, `./`-prefixed names, a `./` root
//! entry, parent directories listed before their children, `md5sums` written automatically).
//! Unsafe names can be injected verbatim with [`DebBuilder::raw_entry`] for tamper tests.

use std::collections::BTreeSet;
use std::io::Write;

use md5::{Digest, Md5};

/// Compression of a `control.tar` or `data.tar` member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
}

impl Compression {
    /// File-name suffix of the ar member (`""`, `".gz"`, ...).
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
        }
    }

    /// Every compression, for round-trip tests.
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
    ];

    fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).expect("gzip to memory");
                e.finish().expect("gzip to memory")
            }
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).expect("xz to memory");
                e.finish().expect("xz to memory")
            }
            Compression::Zstd => zstd::stream::encode_all(data, 3).expect("zstd to memory"),
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
                e.write_all(data).expect("bzip2 to memory");
                e.finish().expect("bzip2 to memory")
            }
        }
    }
}

/// Fixed mtime of every entry (2023-06-10 00:00:00 UTC), so output is reproducible.
pub const MTIME: u64 = 1_686_355_200;

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    Hardlink(String),
    Fifo,
    Char(u32, u32),
}

#[derive(Debug, Clone)]
struct Item {
    /// Name exactly as written into the tar header.
    name: String,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Builder for one synthetic `.deb`.
#[derive(Debug, Clone)]
pub struct DebBuilder {
    package: String,
    version: String,
    arch: String,
    fields: Vec<(String, String)>,
    items: Vec<Item>,
    conffiles: Vec<String>,
    scripts: Vec<(String, String)>,
    data_compression: Compression,
    control_compression: Compression,
}

/// `usr/bin/` or `./usr/bin` → `usr/bin`.
fn clean(path: &str) -> String {
    path.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl DebBuilder {
    pub fn new(package: &str, version: &str, arch: &str) -> Self {
        DebBuilder {
            package: package.to_string(),
            version: version.to_string(),
            arch: arch.to_string(),
            fields: Vec::new(),
            items: vec![Item {
                name: "./".to_string(),
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                xattrs: Vec::new(),
            }],
            conffiles: Vec::new(),
            scripts: Vec::new(),
            data_compression: Compression::Xz,
            control_compression: Compression::Xz,
        }
    }

    /// An extra control field (replaces an earlier one of the same name, case-insensitively).
    pub fn control_field(mut self, name: &str, value: &str) -> Self {
        if let Some(f) = self
            .fields
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            f.1 = value.to_string();
        } else {
            self.fields.push((name.to_string(), value.to_string()));
        }
        self
    }

    fn has(&self, name: &str) -> bool {
        self.items.iter().any(|i| i.name == name)
    }

    /// Adds `./a/`, `./a/b/` ... for every missing parent of `path`.
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            let name = format!("./{prefix}/");
            // Not when the path is already a directory, or a symlink (written through).
            if !self.has(&name) && !self.has(&format!("./{prefix}")) {
                self.items.push(Item {
                    name,
                    kind: Kind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    xattrs: Vec::new(),
                });
            }
        }
    }

    fn push(mut self, path: &str, kind: Kind, mode: u32, uid: u32, gid: u32) -> Self {
        let p = clean(path);
        self.parents(&p);
        let name = match kind {
            Kind::Dir => format!("./{p}/"),
            _ => format!("./{p}"),
        };
        if let Some(existing) = self.items.iter_mut().find(|i| i.name == name) {
            existing.kind = kind;
            existing.mode = mode;
            existing.uid = uid;
            existing.gid = gid;
        } else {
            self.items.push(Item {
                name,
                kind,
                mode,
                uid,
                gid,
                xattrs: Vec::new(),
            });
        }
        self
    }

    /// A directory (parents are added automatically).
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.push(path, Kind::Dir, mode, 0, 0)
    }

    /// A regular file owned by root.
    pub fn file(self, path: &str, mode: u32, contents: &[u8]) -> Self {
        self.file_owned(path, mode, 0, 0, contents)
    }

    /// A regular file with a numeric owner.
    pub fn file_owned(self, path: &str, mode: u32, uid: u32, gid: u32, contents: &[u8]) -> Self {
        self.push(path, Kind::File(contents.to_vec()), mode, uid, gid)
    }

    /// A symbolic link; `target` is stored verbatim.
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.push(path, Kind::Symlink(target.to_string()), 0o777, 0, 0)
    }

    /// A hard link to an earlier archive path (stored as `./target_path`).
    pub fn hardlink(self, path: &str, target_path: &str) -> Self {
        let t = format!("./{}", clean(target_path));
        self.push(path, Kind::Hardlink(t), 0o644, 0, 0)
    }

    pub fn fifo(self, path: &str, mode: u32) -> Self {
        self.push(path, Kind::Fifo, mode, 0, 0)
    }

    pub fn char_device(self, path: &str, mode: u32, major: u32, minor: u32) -> Self {
        self.push(path, Kind::Char(major, minor), mode, 0, 0)
    }

    /// An extended attribute on an entry added earlier, written as PAX `SCHILY.xattr.<name>`.
    pub fn xattr(mut self, path: &str, name: &str, value: &[u8]) -> Self {
        let p = clean(path);
        let item = self
            .items
            .iter_mut()
            .find(|i| i.name.trim_start_matches("./").trim_end_matches('/') == p)
            .unwrap_or_else(|| panic!("xattr on unknown entry {path}"));
        item.xattrs.push((name.to_string(), value.to_vec()));
        self
    }

    /// A regular file (mode 0644) listed in the control member `conffiles`.
    pub fn conffile(mut self, path: &str, contents: &[u8]) -> Self {
        self.conffiles.push(format!("/{}", clean(path)));
        self.file(path, 0o644, contents)
    }

    /// A control member such as `preinst` or `postinst` (mode 0755 for scripts, 0644 for other
    /// names such as `triggers`; a member named `conffiles` replaces the generated one).
    pub fn maintainer_script(mut self, name: &str, body: &str) -> Self {
        self.scripts.push((name.to_string(), body.to_string()));
        self
    }

    /// A regular file whose tar header name is written verbatim (e.g. `../escape`, `/abs`).
    pub fn raw_entry(mut self, header_path: &str, contents: &[u8]) -> Self {
        self.items.push(Item {
            name: header_path.to_string(),
            kind: Kind::File(contents.to_vec()),
            mode: 0o644,
            uid: 0,
            gid: 0,
            xattrs: Vec::new(),
        });
        self
    }

    pub fn data_compression(mut self, c: Compression) -> Self {
        self.data_compression = c;
        self
    }

    pub fn control_compression(mut self, c: Compression) -> Self {
        self.control_compression = c;
        self
    }

    fn installed_size(&self) -> u64 {
        self.items
            .iter()
            .map(|i| match &i.kind {
                Kind::File(d) => (d.len() as u64).div_ceil(1024),
                _ => 1,
            })
            .sum()
    }

    /// The control paragraph, ending in a newline.
    pub fn control_stanza(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("Package: {}\n", self.package));
        s.push_str(&format!("Version: {}\n", self.version));
        s.push_str(&format!("Architecture: {}\n", self.arch));
        let maint = self
            .fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("Maintainer"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "Test Suite <test@example.invalid>".to_string());
        s.push_str(&format!("Maintainer: {maint}\n"));
        s.push_str(&format!("Installed-Size: {}\n", self.installed_size()));
        let skip = ["maintainer", "description", "installed-size"];
        for (n, v) in &self.fields {
            if !skip.contains(&n.to_ascii_lowercase().as_str()) {
                s.push_str(&format!("{n}: {v}\n"));
            }
        }
        let desc = self
            .fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("Description"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| format!("synthetic test package {}", self.package));
        s.push_str(&format!("Description: {desc}\n"));
        s
    }

    fn md5sums(&self) -> String {
        let mut out = String::new();
        for i in &self.items {
            if let Kind::File(d) = &i.kind {
                if i.name.starts_with("./") {
                    let sum = Md5::digest(d);
                    out.push_str(&format!("{}  {}\n", hex::encode(sum), &i.name[2..]));
                }
            }
        }
        out
    }

    /// The whole `.deb` as bytes.
    pub fn build(&self) -> Vec<u8> {
        // control.tar
        let mut members: Vec<(String, u32, Vec<u8>)> = vec![
            ("control".into(), 0o644, self.control_stanza().into_bytes()),
            ("md5sums".into(), 0o644, self.md5sums().into_bytes()),
        ];
        let own_conffiles = self.scripts.iter().any(|(n, _)| n == "conffiles");
        if !self.conffiles.is_empty() && !own_conffiles {
            let mut c = self.conffiles.join("\n");
            c.push('\n');
            members.push(("conffiles".into(), 0o644, c.into_bytes()));
        }
        for (name, body) in &self.scripts {
            let mode = match name.as_str() {
                "preinst" | "postinst" | "prerm" | "postrm" | "config" => 0o755,
                _ => 0o644,
            };
            members.push((name.clone(), mode, body.as_bytes().to_vec()));
        }
        let mut ctl = TarWriter::default();
        ctl.entry("./", b'5', 0o755, 0, 0, &[], "", (0, 0), &[]);
        for (name, mode, data) in &members {
            ctl.entry(
                &format!("./{name}"),
                b'0',
                *mode,
                0,
                0,
                data,
                "",
                (0, 0),
                &[],
            );
        }
        let control_tar = ctl.finish();

        // data.tar
        let mut dt = TarWriter::default();
        let mut seen_dirs = BTreeSet::new();
        for i in &self.items {
            if let Kind::Dir = i.kind {
                if !seen_dirs.insert(i.name.clone()) {
                    continue;
                }
            }
            let (ty, data, link, dev): (u8, &[u8], &str, (u32, u32)) = match &i.kind {
                Kind::Dir => (b'5', &[], "", (0, 0)),
                Kind::File(d) => (b'0', d, "", (0, 0)),
                Kind::Symlink(t) => (b'2', &[], t, (0, 0)),
                Kind::Hardlink(t) => (b'1', &[], t, (0, 0)),
                Kind::Fifo => (b'6', &[], "", (0, 0)),
                Kind::Char(ma, mi) => (b'3', &[], "", (*ma, *mi)),
            };
            dt.entry(
                &i.name, ty, i.mode, i.uid, i.gid, data, link, dev, &i.xattrs,
            );
        }
        let data_tar = dt.finish();

        let mut ar = b"!<arch>\n".to_vec();
        ar_member(&mut ar, "debian-binary", b"2.0\n");
        ar_member(
            &mut ar,
            &format!("control.tar{}", self.control_compression.suffix()),
            &self.control_compression.compress(&control_tar),
        );
        ar_member(
            &mut ar,
            &format!("data.tar{}", self.data_compression.suffix()),
            &self.data_compression.compress(&data_tar),
        );
        ar
    }
}

/// Appends one member in the common ar format, as `dpkg-deb` writes it.
pub fn ar_member(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let header = format!(
        "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
        name,
        0,
        0,
        0,
        "100644",
        data.len()
    );
    assert_eq!(header.len(), 60, "ar member name too long: {name}");
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(b'\n');
    }
}

/// Minimal GNU-format tar writer that keeps names byte-exact (the `tar` crate's `set_path`
/// normalises away `./` and refuses `..`, which test archives need).
#[derive(Default)]
struct TarWriter {
    out: Vec<u8>,
}

impl TarWriter {
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        name: &str,
        ty: u8,
        mode: u32,
        uid: u32,
        gid: u32,
        data: &[u8],
        link: &str,
        dev: (u32, u32),
        xattrs: &[(String, Vec<u8>)],
    ) {
        if !xattrs.is_empty() {
            let mut pax = Vec::new();
            for (k, v) in xattrs {
                let rest = format!(" SCHILY.xattr.{k}=").len() + v.len() + 1;
                let mut len = rest + 1;
                while len.to_string().len() + rest != len {
                    len = len.to_string().len() + rest;
                }
                pax.extend_from_slice(format!("{len} SCHILY.xattr.{k}=").as_bytes());
                pax.extend_from_slice(v);
                pax.push(b'\n');
            }
            self.header(
                "./PaxHeaders/x",
                b'x',
                0o644,
                0,
                0,
                pax.len() as u64,
                "",
                (0, 0),
            );
            self.data(&pax);
        }
        if name.len() > 100 {
            let mut d = name.as_bytes().to_vec();
            d.push(0);
            self.header(
                "././@LongLink",
                b'L',
                0o644,
                0,
                0,
                d.len() as u64,
                "",
                (0, 0),
            );
            self.data(&d);
        }
        if link.len() > 100 {
            let mut d = link.as_bytes().to_vec();
            d.push(0);
            self.header(
                "././@LongLink",
                b'K',
                0o644,
                0,
                0,
                d.len() as u64,
                "",
                (0, 0),
            );
            self.data(&d);
        }
        self.header(name, ty, mode, uid, gid, data.len() as u64, link, dev);
        self.data(data);
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        name: &str,
        ty: u8,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        link: &str,
        dev: (u32, u32),
    ) {
        let mut h = [0u8; 512];
        let n = name.as_bytes();
        h[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], uid as u64);
        octal(&mut h[116..124], gid as u64);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], MTIME);
        h[156] = ty;
        let l = link.as_bytes();
        h[157..157 + l.len().min(100)].copy_from_slice(&l[..l.len().min(100)]);
        h[257..265].copy_from_slice(b"ustar  \0");
        let (un, gn) = (
            if uid == 0 { "root" } else { "" },
            if gid == 0 { "root" } else { "" },
        );
        h[265..265 + un.len()].copy_from_slice(un.as_bytes());
        h[297..297 + gn.len()].copy_from_slice(gn.as_bytes());
        if ty == b'3' || ty == b'4' {
            octal(&mut h[329..337], dev.0 as u64);
            octal(&mut h[337..345], dev.1 as u64);
        }
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.out.extend_from_slice(&h);
    }

    fn data(&mut self, d: &[u8]) {
        self.out.extend_from_slice(d);
        let pad = (512 - d.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend(std::iter::repeat_n(0u8, 1024));
        self.out
    }
}

/// Zero-padded octal with a trailing NUL, filling `field`.
fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    assert!(s.len() <= w, "tar field overflow");
    field[..w].copy_from_slice(s.as_bytes());
    field[w] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_deterministic_ar_archive() {
        let b = DebBuilder::new("hello", "1.0-1", "amd64")
            .control_field("Depends", "libc6 (>= 2.36)")
            .file("usr/bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .symlink("usr/bin/hi", "hello");
        let a = b.build();
        assert_eq!(a, b.build());
        assert!(a.starts_with(b"!<arch>\ndebian-binary   "));
        let stanza = b.control_stanza();
        assert!(stanza.starts_with("Package: hello\nVersion: 1.0-1\nArchitecture: amd64\n"));
        assert!(stanza.contains("Depends: libc6 (>= 2.36)\n"));
        assert!(stanza.ends_with("Description: synthetic test package hello\n"));
        assert!(b.md5sums().contains("  usr/bin/hello\n"));
    }

    #[test]
    fn tar_is_readable_by_the_tar_crate() {
        let mut w = TarWriter::default();
        let long = format!("./{}", "a/".repeat(70) + "file");
        w.entry(&long, b'0', 0o644, 0, 0, b"x", "", (0, 0), &[]);
        w.entry(
            "./f",
            b'0',
            0o644,
            0,
            0,
            b"y",
            "",
            (0, 0),
            &[("user.k".into(), b"v".to_vec())],
        );
        let t = w.finish();
        let mut ar = tar::Archive::new(&t[..]);
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let x = e.pax_extensions().unwrap().map(|p| p.count()).unwrap_or(0);
            names.push((String::from_utf8(e.path_bytes().to_vec()).unwrap(), x));
        }
        assert_eq!(names, vec![(long, 0), ("./f".to_string(), 1)]);
    }
}
