//! Criterion benches for the bootstrap pipeline's CPU-bound steps:
//! Packages parsing, resolution and extraction of a generated package set.
//!
//! `cargo bench --bench pipeline`. The side-by-side comparison with debootstrap
//! and mmdebstrap is a separate command (see README, "Benchmarks").

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nspawn::archive::packages::PackageIndex;
use nspawn::resolve::{self, Request, Variant};
use nspawn::testkit::deb::{Compression, DebBuilder};
use nspawn::unpack::{self, DebInput, MergedUsr, UnpackOptions};

/// A Packages text shaped like a Debian main index: `n` stanzas, a required
/// core, dependency chains with alternatives, versions and provides.
fn synthetic_packages(n: usize) -> String {
    let mut t = String::with_capacity(n * 800);
    for i in 0..n {
        let prio = if i < 80 {
            "required"
        } else if i < 150 {
            "important"
        } else {
            "optional"
        };
        let dep1 = (i * 7 + 3) % n.max(1);
        let dep2 = (i * 13 + 5) % n.max(1);
        t.push_str(&format!(
            "Package: pkg{i}\nSource: src{}\nVersion: 1.{i}-{}\nInstalled-Size: {}\n\
             Maintainer: Someone <someone@example.invalid>\nArchitecture: amd64\n\
             Depends: pkg{dep1} (>= 1.0), libvirtual{} | pkg{dep2}\nProvides: libvirtual{}\n\
             Description: synthetic package {i}\n a long description line to make the stanza\n \
             about as big as the real ones are in a Debian index file.\n\
             Priority: {prio}\nSection: misc\nFilename: pool/main/p/pkg{i}/pkg{i}_1.{i}_amd64.deb\n\
             Size: {}\nMD5sum: 0123456789abcdef0123456789abcdef\n\
             SHA256: {:064x}\n\n",
            i / 3,
            i % 5,
            i * 3 % 9000,
            i % 50,
            i % 50,
            1000 + i,
            i
        ));
    }
    t
}

fn bench_parse(c: &mut Criterion) {
    let text = synthetic_packages(60_000);
    let mut g = c.benchmark_group("packages");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(10);
    g.bench_function("parse_60k_stanzas", |b| {
        b.iter(|| {
            let mut idx = PackageIndex::new();
            idx.add("Packages", black_box(&text)).unwrap();
            black_box(idx.len())
        })
    });
    // The host's real index, when apt has one (not needed for the bench to run).
    if let Some(p) = std::fs::read_dir("/var/lib/apt/lists").ok().and_then(|rd| {
        rd.flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("main_binary-amd64_Packages"))
    }) {
        let real = std::fs::read_to_string(p).unwrap();
        g.throughput(Throughput::Bytes(real.len() as u64));
        g.bench_function("parse_host_index", |b| {
            b.iter(|| {
                let mut idx = PackageIndex::new();
                idx.add("Packages", black_box(&real)).unwrap();
                black_box(idx.len())
            })
        });
    }
    g.finish();
}

fn bench_resolve(c: &mut Criterion) {
    let mut idx = PackageIndex::new();
    idx.add("Packages", &synthetic_packages(60_000)).unwrap();
    let mut g = c.benchmark_group("resolve");
    g.sample_size(20);
    for variant in [Variant::Minbase, Variant::Default] {
        let req = Request {
            variant,
            codename: "bookworm".into(),
            arch: "amd64".into(),
            ..Default::default()
        };
        g.bench_function(format!("{variant}_60k"), |b| {
            b.iter(|| black_box(resolve::resolve(&idx, &req).unwrap().required.len()))
        });
    }
    g.finish();
}

fn bench_extract(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("bench-debs-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // 40 packages of ~150 files each: a small minbase-like set, xz-compressed.
    let mut inputs = Vec::new();
    let mut bytes = 0u64;
    for p in 0..40 {
        let mut d =
            DebBuilder::new(&format!("pkg{p}"), "1.0", "amd64").data_compression(Compression::Xz);
        for f in 0..150 {
            let body: Vec<u8> = (0..(f * 97 % 20_000))
                .map(|i| (i * 31 + p * 7 + f) as u8)
                .collect();
            bytes += body.len() as u64;
            d = d.file(
                &format!("usr/lib/pkg{p}/dir{}/file{f}", f % 10),
                0o644,
                &body,
            );
        }
        d = d.symlink(&format!("usr/bin/pkg{p}"), "../lib/x");
        let path = dir.path().join(format!("pkg{p}_1.0_amd64.deb"));
        std::fs::write(&path, d.build()).unwrap();
        inputs.push(DebInput {
            package: format!("pkg{p}"),
            path,
        });
    }
    let mut g = c.benchmark_group("unpack");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    for jobs in [1usize, 2] {
        g.bench_function(format!("40_debs_jobs{jobs}"), |b| {
            b.iter_with_setup(
                || {
                    tempfile::Builder::new()
                        .prefix("bench-root-")
                        .tempdir_in("/var/tmp")
                        .unwrap()
                },
                |root| {
                    let opts = UnpackOptions {
                        merged_usr: MergedUsr::Yes,
                        jobs,
                    };
                    let r = unpack::unpack_all(root.path(), &inputs, &opts, &|_| {}).unwrap();
                    black_box(r.len());
                    root
                },
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_parse, bench_resolve, bench_extract);
criterion_main!(benches);
